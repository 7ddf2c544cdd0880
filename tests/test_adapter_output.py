"""--output-format adapter: a merged PEFT adapter that PEFT loads and that equals our full merge.

Oracles: the logits of ``PeftModel(base, merged adapter)`` vs transformers on our full merged
model; PEFT's own ``merge_and_unload`` of the merged adapter vs our full merge, tensor by
tensor; an independent truncated SVD for the reported truncation error.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from streammerge import InputSpec, Recipe, merge
from streammerge.errors import PlanError
from tests.helpers import (assert_close_to_reference, load_adapter_file, load_causal_lm, peft_merged_state,
                           read_model, run_cli, save_peft_adapter, save_tiny_gpt2, save_tiny_llama)

LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapter_out")
    base = save_tiny_llama(root / "base", torch.float32)
    return {
        "root": root, "base": base,
        "a1": save_peft_adapter(base, root / "a1", torch.float32, seed=1, r=4, lora_alpha=8, target_modules=LINEAR),
        "a2": save_peft_adapter(base, root / "a2", torch.float32, seed=2, r=8, lora_alpha=4, use_rslora=True,
                                target_modules=["q_proj", "v_proj", "up_proj"],
                                rank_pattern={"layers.1.self_attn.q_proj": 2}),
        "emb": save_peft_adapter(base, root / "emb", torch.float32, seed=3, r=4, lora_alpha=8,
                                 target_modules=["embed_tokens", "q_proj", "lm_head"]),
    }


def _recipe(world, names, **kw) -> Recipe:
    weights = kw.pop("weights", [1.0] * len(names))
    return Recipe(base=str(world["base"]), device="cpu",
                  inputs=tuple(InputSpec(str(world[n]), weight=w) for n, w in zip(names, weights)), **kw)


def _both(world, tmp_path, recipe: Recipe) -> tuple[Path, Path]:
    full, adapter = tmp_path / "full", tmp_path / "adapter"
    merge(recipe, str(full))
    merge(replace(recipe, output_format="adapter"), str(adapter))
    return full, adapter


def _assert_adapter_equals_full(world, full: Path, adapter: Path, tol: float = 1e-5) -> None:
    from peft import PeftModel
    with torch.no_grad():
        got = PeftModel.from_pretrained(load_causal_lm(world["base"], torch.float32), adapter)(IDS).logits
        ref = load_causal_lm(full, torch.float32)(IDS).logits
    torch.testing.assert_close(got, ref, rtol=tol, atol=tol)
    unloaded = peft_merged_state(world["base"], adapter, torch.float32)
    original = read_model(world["base"])
    for name, tensor in read_model(full).items():
        assert_close_to_reference(unloaded[name], tensor, name, original.get(name))


@pytest.mark.parametrize("method, params", [("task_arithmetic", (("lambda", 0.7),)),
                                            ("do_merging", (("steps", 20),))])
def test_exact_low_rank_adapter_equals_full_merge(world, tmp_path, method, params):
    recipe = _recipe(world, ["a1", "a2"], weights=[1.0, -0.5], method=method, params=params)
    full, adapter = _both(world, tmp_path, recipe)
    assert sorted(p.name for p in adapter.iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors", "streammerge_journal.jsonl",
        "streammerge_recipe.json"]
    config = json.loads((adapter / "adapter_config.json").read_text())
    tensors = load_adapter_file(adapter)
    # rank Σr per module, scale 1 (lora_alpha = r), exact factors
    q0 = "base_model.model.model.layers.0.self_attn.q_proj"
    q1 = "base_model.model.model.layers.1.self_attn.q_proj"
    assert tensors[q0 + ".lora_A.weight"].shape == (4 + 8, 64)
    assert tensors[q1 + ".lora_A.weight"].shape == (4 + 2, 64)
    assert tensors["base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"].shape[1] == 4
    assert config["r"] == config["lora_alpha"]
    assert all(config["alpha_pattern"][k] == v for k, v in config["rank_pattern"].items())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert "library_name: peft" in (adapter / "README.md").read_text()
    _assert_adapter_equals_full(world, full, adapter)


def test_embedding_and_lm_head_lora_orientation(world, tmp_path):
    full, adapter = _both(world, tmp_path, _recipe(world, ["emb", "a1"]))
    tensors = load_adapter_file(adapter)
    assert tensors["base_model.model.model.embed_tokens.lora_embedding_A"].shape == (4, 128)
    assert tensors["base_model.model.model.embed_tokens.lora_embedding_B"].shape == (64, 4)
    _assert_adapter_equals_full(world, full, adapter)


def test_dense_method_needs_rank_then_reports_truncation_error(world, tmp_path):
    recipe = _recipe(world, ["a1", "a2"], method="ties", params=(("density", 0.5),))
    with pytest.raises(PlanError, match="pass --rank K"):
        merge(replace(recipe, output_format="adapter"), str(tmp_path / "refused"))
    assert not (tmp_path / "refused").exists()
    # rank 64 >= min(d_out, d_in): the SVD keeps everything, so the adapter equals the full merge.
    full, adapter = tmp_path / "full", tmp_path / "a64"
    merge(recipe, str(full))
    report = merge(replace(recipe, output_format="adapter", rank=64), str(adapter))
    assert max(s["truncation_error"] for s in report.stats.values()) < 1e-5
    _assert_adapter_equals_full(world, full, adapter, tol=1e-4)
    # rank 3: the reported error is the independent ‖ΔW − ΔW_3‖ / ‖ΔW‖ of the dense TIES update.
    small = merge(replace(recipe, output_format="adapter", rank=3), str(tmp_path / "a3"))
    name = "model.layers.0.self_attn.q_proj.weight"
    delta = read_model(full)[name] - read_model(world["base"])[name]
    u, s, vh = torch.linalg.svd(delta.double())
    expected = float((delta.double() - (u[:, :3] * s[:3]) @ vh[:3]).norm() / delta.double().norm())
    assert small.stats[name]["truncation_error"] == pytest.approx(expected, rel=1e-3)
    assert small.stats[name]["adapter_rank"] == 3
    assert load_adapter_file(tmp_path / "a3")["base_model.model." + name[:-7] + ".lora_A.weight"].shape == (3, 64)


def test_rank_truncates_low_rank_results_too(world, tmp_path):
    report = merge(replace(_recipe(world, ["a1", "a2"]), output_format="adapter", rank=5), str(tmp_path / "a"))
    q0 = "model.layers.0.self_attn.q_proj.weight"  # rank 12 -> 5: a real truncation
    assert report.stats[q0]["adapter_rank"] == 5 and 0 < report.stats[q0]["truncation_error"] < 1
    down = "model.layers.0.mlp.down_proj.weight"  # rank 4 <= 5: kept exact
    assert report.stats[down]["adapter_rank"] == 4 and report.stats[down]["truncation_error"] == 0


def test_modules_to_save_input_needs_rank(tmp_path):
    base = save_tiny_llama(tmp_path / "base", torch.float32)
    a = save_peft_adapter(base, tmp_path / "a", torch.float32, seed=4, r=4, lora_alpha=4,
                          target_modules=["q_proj"], modules_to_save=["lm_head"])
    world = {"base": base, "a": a}
    full, adapter = tmp_path / "full", tmp_path / "adapter"
    recipe = _recipe(world, ["a"])
    merge(recipe, str(full))
    with pytest.raises(PlanError, match="pass --rank K"):  # lm_head is replaced wholesale: a dense update
        merge(replace(recipe, output_format="adapter"), str(adapter))
    merge(replace(recipe, output_format="adapter", rank=64), str(adapter))
    _assert_adapter_equals_full(world, full, adapter, tol=1e-4)


def test_gpt2_fan_in_fan_out(tmp_path):
    base = save_tiny_gpt2(tmp_path / "gpt2")
    a = save_peft_adapter(base, tmp_path / "lora", torch.float32, seed=7, r=4, lora_alpha=8,
                          target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    out = tmp_path / "adapter"
    merge(Recipe(base=str(base), inputs=(InputSpec(str(a), weight=0.5),), device="cpu", output_format="adapter"),
          str(out))
    assert json.loads((out / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    from peft import PeftModel
    with torch.no_grad():
        model = load_causal_lm(base, torch.float32)
        reference = PeftModel.from_pretrained(model, a)
        for module in reference.modules():  # the oracle: the input adapter at half strength
            if hasattr(module, "scaling") and isinstance(module.scaling, dict):
                module.scaling = {k: v * 0.5 for k, v in module.scaling.items()}
        ref = reference(IDS).logits
        got = PeftModel.from_pretrained(load_causal_lm(base, torch.float32), out)(IDS).logits
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_gpt2_full_finetune_is_refused(tmp_path):
    base = save_tiny_gpt2(tmp_path / "gpt2")
    ft = save_tiny_gpt2(tmp_path / "ft", seed=1)
    with pytest.raises(PlanError, match="Conv1D layer"):
        merge(Recipe(base=str(base), inputs=(InputSpec(str(ft), kind="model"),), device="cpu",
                     output_format="adapter", rank=8), str(tmp_path / "out"))


def test_cli_adapter_output_summary(world, tmp_path):
    out = tmp_path / "adapter"
    proc = run_cli("merge", "--base", str(world["base"]), "--adapter", str(world["a1"]), "--adapter",
                   str(world["a2"]), "--method", "ties", "--output-format", "adapter", "--rank", "4",
                   "--out", str(out), "--no-progress")
    summary = json.loads(proc.stdout)
    assert summary["format"] == "adapter" and summary["files"] == ["adapter_model.safetensors"]
    assert 0 < summary["method_stats"]["truncation_error"]["max"] < 1
    assert "truncated to rank 4" in proc.stderr
    card = (out / "README.md").read_text()
    assert "truncation_error" in card and "Per module" in card


def test_full_finetune_as_adapter_saves_norms_and_factorizes_matrices(world, tmp_path):
    ft = save_tiny_llama(tmp_path / "ft", torch.float32, seed=1)
    world = {**world, "ft": ft}
    recipe = Recipe(base=str(world["base"]), inputs=(InputSpec(str(ft), kind="model", weight=0.3),), device="cpu")
    full, adapter = tmp_path / "full", tmp_path / "adapter"
    merge(recipe, str(full))
    merge(replace(recipe, output_format="adapter", rank=64), str(adapter))  # 64 = full rank: exact
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert "model.norm" in config["modules_to_save"] and "model.embed_tokens" in config["target_modules"]
    assert "base_model.model.model.norm.weight" in load_adapter_file(adapter)
    _assert_adapter_equals_full(world, full, adapter, tol=1e-4)


def test_lora_bias_becomes_lora_b_bias(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=128, max_position_embeddings=64,
                                 tie_word_embeddings=False)).save_pretrained(tmp_path / "base")
    base = tmp_path / "base"
    a = save_peft_adapter(base, tmp_path / "a", torch.float32, seed=5, r=4, lora_alpha=8,
                          target_modules=["q_proj", "v_proj"], lora_bias=True)
    b = save_peft_adapter(base, tmp_path / "b", torch.float32, seed=6, r=2, lora_alpha=2, target_modules=["k_proj"])
    world = {"base": base, "a": a, "b": b}
    full, adapter = tmp_path / "full", tmp_path / "adapter"
    recipe = _recipe(world, ["a", "b"], weights=[0.8, 1.0])
    merge(recipe, str(full))
    assert not torch.equal(read_model(full)["model.layers.0.self_attn.q_proj.bias"],
                           read_model(base)["model.layers.0.self_attn.q_proj.bias"]), "the LoRA bias was merged"
    merge(replace(recipe, output_format="adapter"), str(adapter))
    # the full merge of a lora_bias adapter alone equals PEFT's merge_and_unload (biases included)
    merge(_recipe(world, ["a"]), str(tmp_path / "a_only"))
    reference = peft_merged_state(base, a, torch.float32)
    for name, tensor in read_model(tmp_path / "a_only").items():
        assert_close_to_reference(tensor, reference[name], name)
    tensors = load_adapter_file(adapter)
    assert json.loads((adapter / "adapter_config.json").read_text())["lora_bias"] is True
    assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias"].abs().sum() > 0
    assert tensors["base_model.model.model.layers.0.self_attn.k_proj.lora_B.bias"].abs().sum() == 0  # no bias change
    _assert_adapter_equals_full(world, full, adapter)


@pytest.mark.parametrize("method", ["linear", "knots", "tsv"])
def test_other_low_rank_methods_are_exact_too(world, tmp_path, method):
    full, adapter = _both(world, tmp_path, _recipe(world, ["a1", "a2"], weights=[1.0, 0.5], method=method))
    _assert_adapter_equals_full(world, full, adapter, tol=1e-4)
