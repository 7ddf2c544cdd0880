"""The merge-quality benchmark (benchmarks/quality/) end to end, at toy scale.

A random 2-layer Llama (hidden 32) with a word-level tokenizer stands in for SmolLM2; two
tasks read the same kind of sentence and predict different words in it. The benchmark's own
code trains a LoRA + head per task, merges through the real ``python -m streammerge merge``
CLI and scores every task with its own head. Oracles: a merge of one adapter gives back that
adapter's own accuracy (the whole chain — PEFT key names on a bare backbone, scaling, heads,
loading the merged directory — agrees with the unmerged PEFT model), and the TA-merged
weights equal ``W0 + Σ s B A`` computed here from the adapter files.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks" / "quality"))

pytest.importorskip("transformers")
pytest.importorskip("peft")

import common  # noqa: E402
import run_merges  # noqa: E402
import train  # noqa: E402

COLORS = ["red", "green", "blue", "black"]
ANIMALS = ["cat", "dog", "owl"]
FILLER = ["the", "a", "small", "big", "old", "new", "sees", "near", "with", "and"]


def _sentence(rng: random.Random) -> tuple[str, int, int]:
    c, a = rng.randrange(len(COLORS)), rng.randrange(len(ANIMALS))
    words = [rng.choice(FILLER) for _ in range(rng.randint(2, 5))] + [COLORS[c], ANIMALS[a]]
    rng.shuffle(words)
    return " ".join(words), c, a


def _tiny_model_and_tasks(cache: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", *COLORS, *ANIMALS, *FILLER])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=0, tie_word_embeddings=True)
    model_dir = cache / common.MODEL_SUBDIR
    LlamaForCausalLM(config).save_pretrained(model_dir, safe_serialization=True)
    tok.save_pretrained(model_dir)

    rng = random.Random(0)
    rows = [_sentence(rng) for _ in range(96)]
    splits = {"train": rows[:64], "validation": rows[64:80], "test": rows[80:]}
    index = {"tasks": {}}
    for name, labels, pick in (("color", COLORS, 1), ("animal", ANIMALS, 2)):
        root = cache / common.TASKS_SUBDIR / name
        for split, part in splits.items():
            common.write_jsonl(root / f"{split}.jsonl",
                               [{"text": r[0], "label": r[pick], "label_name": labels[r[pick]]} for r in part])
        common.write_json(root / "meta.json", {"name": name, "description": name, "labels": labels})
        index["tasks"][name] = {s: len(p) for s, p in splits.items()}
    common.write_json(cache / common.TASKS_SUBDIR / "index.json", index)


def test_quality_pipeline_end_to_end(tmp_path: Path, one_torch_thread: None, capsys: pytest.CaptureFixture) -> None:
    from safetensors.torch import load_file

    cache = tmp_path / "cache"
    _tiny_model_and_tasks(cache)
    train.main(["--cache", str(cache), "--steps", "8", "--batch", "16", "--lr", "5e-3", "--head-lr", "1e-2"])
    trained = json.loads((cache / train.RESULTS).read_text())
    assert sorted(trained) == ["animal", "color"]
    for task in trained:
        assert (cache / common.ADAPTERS_SUBDIR / task / "adapter_model.safetensors").exists()
        assert (cache / common.HEADS_SUBDIR / f"{task}.safetensors").exists()
        assert trained[task]["loss_end"] < trained[task]["loss_start"]

    # One adapter merged alone must score exactly what the unmerged PEFT model scored.
    run_merges.main(["--cache", str(cache), "--configs", "ta", "--tasks", "color", "--keep"])
    single = json.loads((cache / run_merges.MERGE_RESULTS).read_text())["ta@color|default"]
    for split in ("validation", "test"):
        assert single[split]["color"] == pytest.approx(trained["color"]["individual"][split], abs=1 / 16 + 1e-9)

    # The merged weights are W0 + Σ_i s_i B_i A_i (independent oracle from the adapter files).
    run_merges.main(["--cache", str(cache), "--configs", "ta,do,iso_cts,ta_auto", "--keep"])
    base = load_file(str(cache / common.MODEL_SUBDIR / "model.safetensors"))
    merged = load_file(str(cache / "merged" / "ta_default" / "model.safetensors"))
    name = "model.layers.1.mlp.down_proj.weight"
    expected = base[name].clone()
    for task in ("animal", "color"):
        cfg = json.loads((cache / common.ADAPTERS_SUBDIR / task / "adapter_config.json").read_text())
        lora = load_file(str(cache / common.ADAPTERS_SUBDIR / task / "adapter_model.safetensors"))
        prefix = "base_model.model.layers.1.mlp.down_proj"
        expected += cfg["lora_alpha"] / cfg["r"] * lora[f"{prefix}.lora_B.weight"] @ lora[f"{prefix}.lora_A.weight"]
    torch.testing.assert_close(merged[name], expected, rtol=1e-5, atol=1e-6)
    assert not torch.equal(merged[name], base[name])

    results = json.loads((cache / run_merges.MERGE_RESULTS).read_text())
    for key in ("ta|default", "do|default", "iso_cts|default", "ta_auto|default"):
        assert set(results[key]["test"]) == {"animal", "color"}
        assert all(0.0 <= v <= 1.0 for v in results[key]["test"].values())
        assert results[key]["command"].startswith("python -m streammerge merge --base $CACHE/")
    assert "ortho_cross_gram_A_before" in json.dumps(results["do|default"]["method_stats"])
    report = capsys.readouterr().out
    assert "| DO-Merging | 1 |" in report and "| Task Arithmetic | 1 |" in report
    assert "| Iso-CTS | 1 |" in report and "| Task Arithmetic, λ auto | auto (mean " in report
    assert "| Iso-CTS − Task Arithmetic | default |" in report


def test_suite_splits_are_disjoint_balanced_and_deterministic() -> None:
    import build_suite

    pairs = [(f"text number {i}", "ab"[i % 2]) for i in range(400)] + [("clash", "a"), ("clash", "b")]
    first = build_suite.split_rows("toy", ("a", "b"), iter(pairs))
    assert first == build_suite.split_rows("toy", ("a", "b"), iter(reversed(pairs)))
    texts = {s: {r["text"] for r in rows} for s, rows in first.items()}
    assert not (texts["train"] & texts["test"]) and not (texts["validation"] & texts["test"])
    assert "clash" not in set().union(*texts.values())
    assert sum(len(t) for t in texts.values()) == 400  # below the caps every text is used once
    many = [(f"text number {i}", "ab"[i % 7 == 0]) for i in range(20000)]  # b is the rare class
    capped = build_suite.split_rows("toy", ("a", "b"), iter(many))["test"]
    counts = [sum(r["label"] == lab for r in capped) for lab in (0, 1)]
    assert len(capped) == build_suite.CAPS["test"] and counts[0] == counts[1]


def test_encoder_family_end_to_end(tmp_path: Path, one_torch_thread: None) -> None:
    """The encoder suite's path: a BERT backbone named by ``family.json``, LoRA on the regex targets
    of prepare_encoder.py (not the pooler), merged through the CLI; oracles as for the decoder."""
    import prepare_encoder
    from safetensors.torch import load_file
    from transformers import BertConfig, BertModel

    cache = tmp_path / "cache"
    _tiny_model_and_tasks(cache)  # the tasks and the tokenizer; the Llama model is replaced below
    common.write_json(cache / common.FAMILY_FILE, {"model_subdir": "bert", "lora_targets": prepare_encoder.LORA_TARGETS})
    torch.manual_seed(0)
    config = BertConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=64, pad_token_id=0)
    BertModel(config).save_pretrained(cache / "bert", safe_serialization=True)
    for f in (cache / common.MODEL_SUBDIR).iterdir():  # the word-level tokenizer files
        if f.name.startswith(("tokenizer", "special_tokens")):
            (cache / "bert" / f.name).write_bytes(f.read_bytes())
    assert common.model_dir(cache) == cache / "bert"

    train.main(["--cache", str(cache), "--steps", "8", "--batch", "16", "--lr", "5e-3", "--head-lr", "1e-2"])
    trained = json.loads((cache / train.RESULTS).read_text())
    lora = load_file(str(cache / common.ADAPTERS_SUBDIR / "color" / "adapter_model.safetensors"))
    modules = {k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for k in lora}
    assert len(modules) == 2 * 6 and not any("pooler" in m for m in modules)

    run_merges.main(["--cache", str(cache), "--configs", "ta", "--tasks", "color"])
    single = json.loads((cache / run_merges.MERGE_RESULTS).read_text())["ta@color|default"]
    for split in ("validation", "test"):
        assert single[split]["color"] == pytest.approx(trained["color"]["individual"][split], abs=1 / 16 + 1e-9)
    run_merges.main(["--cache", str(cache), "--configs", "ta", "--keep"])
    base = load_file(str(cache / "bert" / "model.safetensors"))
    merged = load_file(str(cache / "merged" / "ta_default" / "model.safetensors"))
    name = "encoder.layer.1.output.dense.weight"
    expected = base[name].clone()
    for task in ("animal", "color"):
        cfg = json.loads((cache / common.ADAPTERS_SUBDIR / task / "adapter_config.json").read_text())
        ad = load_file(str(cache / common.ADAPTERS_SUBDIR / task / "adapter_model.safetensors"))
        prefix = f"base_model.model.{name.removesuffix('.weight')}"
        expected += cfg["lora_alpha"] / cfg["r"] * ad[f"{prefix}.lora_B.weight"] @ ad[f"{prefix}.lora_A.weight"]
    torch.testing.assert_close(merged[name], expected, rtol=1e-5, atol=1e-6)
    assert not torch.equal(merged[name], base[name])


def test_encoder_suite_transforms_and_splits(monkeypatch: pytest.MonkeyPatch) -> None:
    import build_encoder_suite as bes

    texts = [f"word{i} alpha beta gamma delta epsilon zeta{i}" for i in range(3000)]
    monkeypatch.setitem(bes.FORM_TASKS, "toy", ("toy", ("original", "shuffled"), lambda: iter(texts),
                                                bes.shuffle_words))
    first = bes.build_form("toy")
    assert first == bes.build_form("toy")
    originals = {s: {" ".join(sorted(r["text"].split())) for r in rows} for s, rows in first.items()}
    assert not (originals["train"] & originals["test"]) and not (originals["validation"] & originals["test"])
    for split, rows in first.items():
        assert len(rows) == bes.CAPS[split] and sum(r["label"] for r in rows) == len(rows) // 2
        for r in rows:
            assert (r["text"] in texts) == (r["label"] == 0)
    rng = __import__("random").Random(0)
    assert bes.rotate("a b c d e f g h", 2, rng) == "e f g h a b c d"
    assert bes.swap_halves("a b c d e f", 0, rng) == "a b c d e f"
    assert sorted(bes.double_word("a b c", 1, rng).split()) in (["a", "a", "b", "c"], ["a", "b", "b", "c"],
                                                                 ["a", "b", "c", "c"])
    assert bes.pair(("hello world", "hallo welt"), 1, rng) == "hallo welt / hello world"
    assert bes.last_to_front("Datei konnte nicht geöffnet werden", 1, rng) == "werden Datei konnte nicht geöffnet"
    assert bes.last_to_front("Datei konnte nicht geöffnet werden", 0, rng) == "Datei konnte nicht geöffnet werden"


def test_parallel_runs_keep_each_others_splits(tmp_path: Path) -> None:
    """A process that read the results before another one added a test split must not drop it."""
    path = tmp_path / run_merges.MERGE_RESULTS
    stale = {"ta|0.5": {"validation": {"t": 0.5}, "correct": {"validation": {"t": "01"}}}}
    common.write_json(path, {"ta|0.5": {"validation": {"t": 0.5}, "test": {"t": 0.7},
                                        "correct": {"validation": {"t": "01"}, "test": {"t": "011"}}},
                             "do|0.5": {"validation": {"t": 0.6}}})
    run_merges.sync_with_file(stale, "ta|0.5", path)
    assert stale["ta|0.5"]["test"] == {"t": 0.7} and stale["ta|0.5"]["correct"]["test"] == {"t": "011"}
    assert stale["do|0.5"] == {"validation": {"t": 0.6}}
    mine = {"iso_c|2": {"validation": {"t": 0.4}}}
    run_merges.sync_with_file(mine, "iso_c|2", path)
    assert set(mine) == {"ta|0.5", "do|0.5", "iso_c|2"} and mine["iso_c|2"]["validation"] == {"t": 0.4}
