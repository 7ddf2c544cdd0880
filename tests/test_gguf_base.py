"""Merging onto a GGUF base: the GGUF of the base, merged, == the GGUF of the HF merge; and back to HF.

A SmolLM2-shaped Llama (bf16, SmolLM2's real tokenizer) and two PEFT adapters.  The HF merge is
the reference.  Its GGUF is made by llama.cpp's pinned ``convert_hf_to_gguf.py`` in the slow tier
and by our ``write_gguf`` in the default tier (``test_gguf_output`` checks the two equal byte for
byte on this model, for bf16 and q8_0), so the default tier needs no converter run.

* GGUF base → ``--output-format gguf``: every key outside ``general.*`` and every tensor info equal
  to the reference; untouched tensors byte-identical; changed ones exact for a bf16 base and within
  q8_0's rounding (two steps of the block scale) for a q8_0 base.
* GGUF base → ``--output-format model``: transformers loads it (config rebuilt from the metadata,
  tokenizer rebuilt), every tensor equals the HF merge exactly for a bf16 base and within half a
  q8_0 step (the base's quantization) for a q8_0 base.
* The job resumes to identical bytes, verifies and re-runs as a no-op; refusals name the way out.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from streammerge import InputSpec, Recipe, build_plan, merge, run_plan
from streammerge.errors import InputError, PlanError
from streammerge.jobs.verify import verify_output
from tests.gguf_oracle import gguf_sections, llamacpp_tree, run_converter, smollm2_tokenizer
from tests.helpers import read_model, save_peft_adapter
from tests.test_gguf_output import _save_model
from tests.test_resume import killed_run

gguf = pytest.importorskip("gguf")

TARGETS = ["q_proj", "k_proj", "v_proj", "down_proj"]


def _make(root: Path, kind: str, dtype: torch.dtype) -> tuple[Path, Recipe]:
    """A base, two adapters (large enough scale that the update dwarfs a q8_0 step) and the HF merge."""
    base = _save_model(kind, root / "base", dtype)
    adapters = [save_peft_adapter(base, root / f"a{i}", dtype, seed=i, r=4, lora_alpha=64, target_modules=TARGETS)
                for i in (1, 2)]
    recipe = Recipe(base=str(base), inputs=tuple(InputSpec(str(a), weight=w) for a, w in zip(adapters, (1.0, 0.5))),
                    method="task_arithmetic", device="cpu")
    merge(recipe, str(root / "hf"))
    # --dtype of the HF model: the GGUF-base merge rounds as the HF merge did before its conversion
    return base, replace(recipe, dtype=str(dtype).removeprefix("torch."))


def _ggufs(root: Path, types: tuple[str, ...], converter: bool) -> None:
    """``base-T.gguf`` and ``hf-T.gguf`` for each type: by llama.cpp's converter, or our equal ``write_gguf``."""
    jobs = [[str(root / src), "--outtype", t, "--outfile", str(root / f"{src}-{t}.gguf")]
            for src in ("base", "hf") for t in types]
    if converter:
        run_converter(jobs)
        return
    from streammerge.sinks.gguf_export import write_gguf
    for src, _, t, _, out in jobs:
        write_gguf(src, out, t)


@pytest.fixture(scope="module")
def fast(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf-base")
    smollm2_tokenizer()
    base, recipe = _make(root, "smollm2", torch.bfloat16)
    _ggufs(root, ("bf16", "q8_0"), converter=False)
    return root, recipe


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    llamacpp_tree()
    out = {}
    for kind, dtype in (("smollm2", torch.bfloat16), ("qwen2", torch.float16)):
        root = tmp_path_factory.mktemp(f"gguf-base-{kind}")
        _, recipe = _make(root, kind, dtype)
        _ggufs(root, ("f16", "bf16", "q8_0"), converter=True)
        out[kind] = root, recipe
    return out


def _tensors(path: Path) -> tuple[dict, list, dict[str, tuple[str, bytes]]]:
    """Keys outside general.*, tensor infos, and each tensor's (type name, bytes)."""
    kv, infos, data = gguf_sections(path)
    tensors = {}
    for name, dims, ttype, offset in infos:
        qtype = gguf.GGMLQuantizationType(ttype)
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        tensors[name] = (qtype.name, data[offset:offset + int(np.prod(dims)) // block * size])
    return {k: v for k, v in kv.items() if not k.startswith("general.")}, infos, tensors


def _values(ttype: str, raw: bytes, cols: int) -> np.ndarray:
    stored = np.frombuffer(raw, dtype=np.uint8)
    values = gguf.quants.dequantize(stored, gguf.GGMLQuantizationType[ttype])
    return np.asarray(values, dtype=np.float64).reshape(-1, cols)


def _q8_step(values: np.ndarray) -> np.ndarray:
    """Each element's q8_0 step: its 32-block's absolute maximum / 127."""
    blocks = np.abs(values).reshape(values.shape[0], -1, 32).max(axis=2) / 127
    return np.repeat(blocks, 32, axis=1)


def _check_gguf_merge(root: Path, recipe: Recipe, gguf_type: str, out: Path) -> None:
    merge(replace(recipe, base=str(root / f"base-{gguf_type}.gguf"), output_format="gguf"), str(out))
    (kv, infos, ours), (ref_kv, ref_infos, ref) = _tensors(out / "model.gguf"), _tensors(root / f"hf-{gguf_type}.gguf")
    _, _, base = _tensors(root / f"base-{gguf_type}.gguf")
    assert sorted(kv) == sorted(ref_kv) and [k for k in kv if kv[k] != ref_kv[k]] == []
    assert infos == ref_infos  # names, shapes, types and offsets, in order
    changed = [n for n in ref if ref[n] != base[n]]
    assert len(changed) == 2 * len(TARGETS)  # two layers
    for name, (ttype, data) in ours.items():
        if name not in changed:
            assert data == ref[name][1] == base[name][1], name  # copied byte for byte
            continue
        cols = next(d for n, d, *_ in infos if n == name)[0]
        got, want, before = (_values(ttype, d, cols) for d in (data, ref[name][1], base[name][1]))
        if gguf_type == "q8_0":
            assert np.all(np.abs(got - want) <= 2 * _q8_step(want) + 2 ** -8 * np.abs(want)), name
            assert np.abs(got - want).mean() < 0.2 * np.abs(want - before).mean(), name  # the update is there
        elif (recipe.dtype, gguf_type) != ("float16", "bf16"):
            # f16/bf16 dequantize exactly and hold the model's values: with --dtype of the HF model the merge
            # rounds as the HF merge did, to the same bytes
            assert data == ref[name][1], name
        else:  # a bf16 GGUF of an f16 model lost the base's low bits (half a bf16 ulp of W), then one ulp of rounding
            assert np.all(np.abs(got - want) <= 2 ** -8 * np.abs(before) + 2 ** -7 * np.abs(want)), name
    assert verify_output(out).ok


def _check_hf_merge(root: Path, recipe: Recipe, gguf_type: str, out: Path) -> None:
    import transformers
    merge(replace(recipe, base=str(root / f"base-{gguf_type}.gguf")), str(out))
    ours, want, base = read_model(out), read_model(root / "hf"), read_model(root / "base")
    same_type = recipe.dtype == {"f16": "float16", "bf16": "bfloat16"}.get(gguf_type)
    assert sorted(ours) == sorted(want)
    for name, value in ours.items():
        w = want[name].double()
        diff = (value.double() - w).abs()
        if gguf_type == "q8_0" and value.ndim == 2:  # the base's quantization: half its step, plus two roundings
            step = torch.from_numpy(_q8_step(base[name].double().numpy()))
            bound = 0.5 * step * 1.01 + 2 ** -7 * w.abs()
            assert bool((diff <= bound).all()), name
        elif same_type or value.ndim == 1:  # exact: same dtype, or a norm (F32 in GGUF)
            assert float(diff.max()) == 0, name
        else:  # a bf16 GGUF of an f16 model (or the reverse): W rounded to the GGUF type, then the output rounding
            bound = 2 ** -8 * base[name].double().abs() + 2 ** -10 * w.abs() + 2 ** -24  # (f16: subnormals too)
            assert bool((diff <= bound).all()), name
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    reference = transformers.AutoModelForCausalLM.from_pretrained(root / "hf")
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "max_position_embeddings", "rms_norm_eps", "vocab_size", "tie_word_embeddings", "rope_parameters",
                "model_type"):
        assert getattr(model.config, key) == getattr(reference.config, key), key
    tokenizer, original = (transformers.AutoTokenizer.from_pretrained(p) for p in (out, root / "base"))
    text = "The quick brown fox <|im_start|> jumps over 12345 lazy dogs."
    assert tokenizer(text).input_ids == original(text).input_ids
    assert tokenizer.eos_token == original.eos_token
    assert verify_output(out).ok


TYPES = [pytest.param("bf16", marks=pytest.mark.slow), "q8_0"]  # the default tier: q8_0 only


@pytest.mark.parametrize("gguf_type", TYPES)
def test_gguf_base_merged_to_gguf_equals_gguf_of_the_hf_merge(fast, gguf_type, tmp_path):
    root, recipe = fast
    _check_gguf_merge(root, recipe, gguf_type, tmp_path / "out")


@pytest.mark.parametrize("gguf_type", TYPES)
def test_gguf_base_merged_to_hf_equals_the_hf_merge(fast, gguf_type, tmp_path):
    root, recipe = fast
    _check_hf_merge(root, recipe, gguf_type, tmp_path / "out")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["smollm2", "qwen2"])
@pytest.mark.parametrize("gguf_type", ["f16", "bf16", "q8_0"])
def test_converter_gguf_base_merged_equals_converter_gguf_of_the_hf_merge(oracle, kind, gguf_type, tmp_path):
    root, recipe = oracle[kind]
    _check_gguf_merge(root, recipe, gguf_type, tmp_path / "gguf")
    _check_hf_merge(root, recipe, gguf_type, tmp_path / "hf")


@pytest.mark.parametrize("fmt", ["gguf", pytest.param("model", marks=pytest.mark.slow)])
def test_gguf_base_job_resumes_to_identical_bytes_and_reruns_as_a_no_op(fast, fmt, tmp_path):
    root, recipe = fast
    plan = build_plan(replace(recipe, base=str(root / "base-q8_0.gguf"), output_format=fmt))
    reference, out = tmp_path / f"ref-{fmt}", tmp_path / f"out-{fmt}"
    run_plan(plan, reference)
    killed_run(plan, out, "record:1")
    assert not verify_output(out).ok
    assert not run_plan(plan, out).already_complete
    for path in reference.iterdir():
        if path.name not in ("streammerge_journal.jsonl", "README.md"):
            assert (out / path.name).read_bytes() == path.read_bytes(), path.name
    assert run_plan(plan, out).already_complete
    assert verify_output(out).ok


def test_gguf_base_in_a_directory_and_its_plan(fast, tmp_path):
    root, recipe = fast
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.gguf").symlink_to(root / "base-q8_0.gguf")
    plan = build_plan(replace(recipe, base=str(tmp_path / "m"), output_format="gguf"))
    assert plan.base_format == "gguf"
    assert {t.dtype for t in plan.tensors} == {"GGUF_Q8_0", "GGUF_F32"}
    assert plan.merged_count == 2 * len(TARGETS)


def test_gguf_base_refusals_name_the_way_out(fast, tmp_path):
    root, recipe = fast
    on_gguf = replace(recipe, base=str(root / "base-q8_0.gguf"))
    with pytest.raises(PlanError, match="'adapter' cannot be written from a gguf base"):
        build_plan(replace(on_gguf, output_format="adapter", rank=4))
    with pytest.raises(PlanError, match="full fine-tunes cannot be merged into a gguf base"):
        build_plan(replace(on_gguf, inputs=(InputSpec(str(root / "hf"), kind="model"),)))
    # A tensor in a type gguf-py cannot dequantize, and an architecture we cannot map.
    from streammerge.inputs.gguf_checkpoint import open_gguf_checkpoint
    from streammerge.io.gguf_file import GGUFFileWriter, TensorEntry
    for arch, ttype, match in (("llama", "Q8_1", "stored as Q8_1, which gguf-py cannot dequantize"),
                               ("gpt2", "F32", "has architecture 'gpt2'")):
        w = gguf.GGUFWriter(None, arch)
        w.add_block_count(1)
        w.add_head_count(2)
        meta = [(k, v.value, int(v.type), None) for k, v in w.kv_data[0].items()]
        nbytes = 32 // gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[ttype]][0] \
            * gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[ttype]][1] * 2
        entry = TensorEntry("blk.0.ffn_up.weight" if arch == "llama" else "blk.0.ffn_up.weight", (2, 32), ttype, nbytes)
        path = tmp_path / f"{arch}.gguf"
        with GGUFFileWriter(path, arch, meta, [entry]) as writer:
            writer.write_bytes(entry.name, bytes(nbytes))
            writer.commit()
        with pytest.raises(InputError, match=match):
            open_gguf_checkpoint(path)


def test_split_gguf_base_merges_like_the_single_file(fast, tmp_path):
    """A split base (llama.cpp's layout, given by its first file) merges to the same GGUF bytes as the single file."""
    from streammerge.sinks.gguf_export import write_gguf
    root, recipe = fast
    (tmp_path / "split").mkdir()
    parts = write_gguf(root / "base", tmp_path / "split" / "model.gguf", "q8_0", max_shard_size=2 << 20)
    assert len(parts) > 1 and parts[0][0].name == f"model-00001-of-{len(parts):05d}.gguf"
    for base, out in ((parts[0][0], tmp_path / "from-split"), (root / "base-q8_0.gguf", tmp_path / "from-single")):
        merge(replace(recipe, base=str(base), output_format="gguf"), str(out))
    assert (tmp_path / "from-split" / "model.gguf").read_bytes() == (tmp_path / "from-single" / "model.gguf").read_bytes()


@pytest.mark.slow
def test_mistral_adapter_fits_a_mistral_gguf_base(tmp_path):
    """llama.cpp stores Mistral as 'llama': a Mistral adapter is not refused as made for another family."""
    from streammerge.sinks.gguf_export import write_gguf
    base = _save_model("mistral", tmp_path / "base", torch.bfloat16)
    adapter = save_peft_adapter(base, tmp_path / "a", torch.bfloat16, seed=1, r=4, target_modules=["q_proj"])
    write_gguf(base, tmp_path / "base.gguf", "q8_0")
    plan = build_plan(Recipe(base=str(tmp_path / "base.gguf"), inputs=(InputSpec(str(adapter)),), device="cpu"))
    assert plan.merged_count == 2
    gpt2 = tmp_path / "gpt2-adapter"
    gpt2.mkdir()
    config = (adapter / "adapter_config.json").read_text().replace("MistralForCausalLM", "GPT2LMHeadModel")
    (gpt2 / "adapter_config.json").write_text(config)
    (gpt2 / "adapter_model.safetensors").write_bytes((adapter / "adapter_model.safetensors").read_bytes())
    with pytest.raises(PlanError, match="made for a GPT2LMHeadModel model but the base is a LlamaForCausalLM"):
        build_plan(Recipe(base=str(tmp_path / "base.gguf"), inputs=(InputSpec(str(gpt2)),), device="cpu"))


@pytest.mark.slow
def test_llama3_rope_gguf_base(tmp_path):
    """A GGUF with rope_freqs (Llama-3 RoPE scaling): GGUF output copies it; an HF config is written only when
    the stored factors are Llama 3.1's (the parameters are not in the GGUF), else refused naming the way out."""
    from streammerge.sinks.gguf_export import write_gguf
    base = _save_model("llama3", tmp_path / "base", torch.float32)  # original context 64: not Llama 3.1's
    adapter = save_peft_adapter(base, tmp_path / "a", torch.float32, seed=1, r=4, target_modules=["v_proj"])
    write_gguf(base, tmp_path / "base.gguf", "f16")
    recipe = Recipe(base=str(tmp_path / "base.gguf"), inputs=(InputSpec(str(adapter)),), device="cpu")
    merge(replace(recipe, output_format="gguf"), str(tmp_path / "out"))
    _, _, ours = _tensors(tmp_path / "out" / "model.gguf")
    _, _, stored = _tensors(tmp_path / "base.gguf")
    assert ours["rope_freqs.weight"] == stored["rope_freqs.weight"]
    with pytest.raises(PlanError, match="rope_freqs tensor .* is not Llama 3.1's"):
        build_plan(recipe)
    # Llama 3.1's factors: written back, and transformers reads the same RoPE parameters as the original's
    import shutil

    import transformers
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=49152, rope_parameters=rope)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "l31")
    for f in smollm2_tokenizer().iterdir():
        shutil.copy(f, tmp_path / "l31" / f.name)
    write_gguf(tmp_path / "l31", tmp_path / "l31.gguf", "f16")
    a31 = save_peft_adapter(tmp_path / "l31", tmp_path / "a31", torch.float32, seed=1, r=4, target_modules=["v_proj"])
    merge(Recipe(base=str(tmp_path / "l31.gguf"), inputs=(InputSpec(str(a31)),), device="cpu"), str(tmp_path / "l31-hf"))
    ours = transformers.AutoConfig.from_pretrained(tmp_path / "l31-hf")
    assert ours.rope_parameters == transformers.AutoConfig.from_pretrained(tmp_path / "l31").rope_parameters
