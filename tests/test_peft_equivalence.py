"""Our merge of real PEFT adapters equals PEFT's own merge_and_unload, tensor by tensor."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from streammerge import InputSpec, Recipe, merge
from tests.helpers import (assert_close_to_reference, load_adapter_file, load_causal_lm, peft_merged_state,
                           read_model, read_raw, save_peft_adapter, save_tiny_gpt2, save_tiny_llama)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
LINEAR_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

ADAPTERS = {
    "plain": dict(r=4, lora_alpha=8, target_modules=LINEAR_TARGETS),
    "rslora": dict(r=8, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"]),
    "patterns": dict(r=4, lora_alpha=16, target_modules=["q_proj", "o_proj", "up_proj"],
                     rank_pattern={"layers.1.self_attn.q_proj": 2, "up_proj": 6},
                     alpha_pattern={"o_proj": 3.0}),
    "embedding": dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]),
    "lm_head": dict(r=2, lora_alpha=2, target_modules=["lm_head", "v_proj"]),
    "lora_bias_and_saved_module": dict(r=4, lora_alpha=4, target_modules=["q_proj"], modules_to_save=["lm_head"]),
}


@pytest.fixture(scope="module", params=list(DTYPES))
def base(request, tmp_path_factory) -> tuple[Path, torch.dtype]:
    dtype = DTYPES[request.param]
    return save_tiny_llama(tmp_path_factory.mktemp(f"base_{request.param}"), dtype), dtype


def _merge(tmp: Path, base_dir: Path, adapters: list[Path], **kw) -> Path:
    out = tmp / "merged"
    recipe = Recipe(base=str(base_dir), inputs=tuple(InputSpec(str(a)) for a in adapters), device="cpu", **kw)
    merge(recipe, str(out))
    return out


@pytest.mark.parametrize("kind", list(ADAPTERS))
def test_single_adapter_equals_peft_merge_and_unload(base, kind, tmp_path):
    base_dir, dtype = base
    assert (base_dir / "model.safetensors.index.json").exists(), "the base must be sharded for this test"
    adapter = save_peft_adapter(base_dir, tmp_path / kind, dtype, seed=1, **ADAPTERS[kind])
    out = _merge(tmp_path, base_dir, [adapter])
    ours = read_model(out)
    reference = peft_merged_state(base_dir, adapter, dtype)
    original = read_model(base_dir)
    expected_names = set(original) | ({"lm_head.weight"} if "lm_head.weight" not in original and "lm_head" in kind else set())
    assert set(ours) == expected_names, "the output must hold exactly the base's tensors"
    for name, tensor in ours.items():
        assert_close_to_reference(tensor, reference[name], name, original.get(name))


def test_untouched_tensors_are_byte_identical(base, tmp_path):
    base_dir, dtype = base
    adapter = save_peft_adapter(base_dir, tmp_path / "a", dtype, seed=2, **ADAPTERS["rslora"])
    out = _merge(tmp_path, base_dir, [adapter])
    ours, original = read_raw(out), read_raw(base_dir)
    touched = {k.split("base_model.model.")[1].rsplit(".lora_", 1)[0] + ".weight" for k in load_adapter_file(adapter)}
    untouched = [n for n in original if n not in touched]
    assert untouched and len(untouched) < len(original)
    for name in untouched:
        assert ours[name] == original[name], name
    for name in touched:
        assert ours[name] != original[name], name


def test_transformers_loads_output_with_peft_logits(base, tmp_path):
    base_dir, dtype = base
    adapter = save_peft_adapter(base_dir, tmp_path / "a", dtype, seed=3, **ADAPTERS["embedding"])
    out = _merge(tmp_path, base_dir, [adapter])
    from peft import PeftModel
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = PeftModel.from_pretrained(load_causal_lm(base_dir, dtype), adapter).merge_and_unload()(ids).logits
        got = load_causal_lm(out, dtype)(ids).logits
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(got.float(), ref.float(), rtol=tol, atol=tol)


def dense_oracle(base_state, adapters, weights, lam=1.0):
    """Independent reference: W0 + λ Σ w_i s_i B_i A_i, straight from the formula."""
    from tests.helpers import adapter_config
    expected = {k: v.float().clone() for k, v in base_state.items()}
    for adapter, w in zip(adapters, weights):
        cfg = adapter_config(adapter)
        tensors = load_adapter_file(adapter)
        for key, a in tensors.items():
            if ".lora_A." not in key:
                continue
            module = key.removeprefix("base_model.model.").split(".lora_A.")[0]
            b = tensors[key.replace("lora_A", "lora_B")]
            scale = cfg["lora_alpha"] / cfg["r"]
            expected[module + ".weight"] += lam * w * scale * (b.float() @ a.float())
    return expected


def test_several_adapters_equal_dense_oracle(base, tmp_path):
    base_dir, dtype = base
    a1 = save_peft_adapter(base_dir, tmp_path / "a1", dtype, seed=4, r=4, lora_alpha=8, target_modules=LINEAR_TARGETS)
    a2 = save_peft_adapter(base_dir, tmp_path / "a2", dtype, seed=5, r=8, lora_alpha=8, target_modules=["q_proj", "up_proj"])
    a3 = save_peft_adapter(base_dir, tmp_path / "a3", dtype, seed=6, r=2, lora_alpha=6, target_modules=["q_proj"])
    weights = [1.0, 0.5, -0.25]
    out = tmp_path / "merged"
    recipe = Recipe(base=str(base_dir), inputs=(InputSpec(str(a1), weight=1.0), InputSpec(str(a2), weight=0.5),
                                                InputSpec(str(a3), weight=-0.25)),
                    params=(("lambda", 0.7),), device="cpu")
    merge(recipe, str(out))
    original = read_model(base_dir)
    expected = dense_oracle(original, [a1, a2, a3], weights, lam=0.7)
    for name, tensor in read_model(out).items():
        assert_close_to_reference(tensor, expected[name].to(dtype), name, original[name])


def test_gpt2_fan_in_fan_out_adapter_equals_peft(tmp_path):
    base_dir = save_tiny_gpt2(tmp_path / "gpt2")
    adapter = save_peft_adapter(base_dir, tmp_path / "lora", torch.float32, seed=7, r=4, lora_alpha=8,
                                target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    out = _merge(tmp_path, base_dir, [adapter])
    reference = peft_merged_state(base_dir, adapter, torch.float32)
    ours = read_model(out)
    for name, tensor in ours.items():
        ref_name = name if name in reference else "transformer." + name
        assert_close_to_reference(tensor, reference[ref_name], name)


def test_tied_lm_head_adapter_unties_in_output(tmp_path):
    base_dir = save_tiny_llama(tmp_path / "tied", torch.float32, tied=True)
    assert "lm_head.weight" not in read_model(base_dir)
    adapter = save_peft_adapter(base_dir, tmp_path / "a", torch.float32, seed=8, r=2, lora_alpha=2,
                                target_modules=["lm_head", "q_proj"])
    out = _merge(tmp_path, base_dir, [adapter])
    ours = read_model(out)
    assert "lm_head.weight" in ours
    import json
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    # The oracle is the adapter's own forward pass (not merged): PEFT's merge_and_unload would write the
    # lm_head delta into the shared embedding matrix and so change the input embeddings too.
    from peft import PeftModel
    ids = torch.randint(0, 128, (1, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = PeftModel.from_pretrained(load_causal_lm(base_dir, torch.float32), adapter)(ids).logits
        got = load_causal_lm(out, torch.float32)(ids).logits
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
