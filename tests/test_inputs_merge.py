"""DoRA adapters and MoE expert LoRAs through the whole engine (plan → worker → sink), PEFT as the oracle."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from streammerge import InputSpec, Recipe, merge
from streammerge.errors import PlanError
from streammerge.methods import DenseUpdate, MergeInputs, get_method
from tests.helpers import assert_close_to_reference, load_causal_lm, peft_merged_state, read_model, save_tiny_llama
from tests.test_dora import LLAMA_TARGETS, save_dora_adapter
from tests.test_moe_lora import build

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _merge(base: Path, adapters: list[Path], out: Path, **kw) -> dict[str, torch.Tensor]:
    merge(Recipe(base=str(base), inputs=tuple(InputSpec(str(a)) for a in adapters), device="cpu", **kw), str(out))
    return read_model(out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_one_dora_adapter_through_the_engine_equals_peft(tmp_path: Path, dtype: torch.dtype) -> None:
    base = save_tiny_llama(tmp_path / "base", dtype)
    adapter = save_dora_adapter(base, tmp_path / "dora", dtype, seed=1, r=4, lora_alpha=8, target_modules=LLAMA_TARGETS)
    reference = peft_merged_state(base, adapter, dtype)
    ours = _merge(base, [adapter], tmp_path / "out")
    original = read_model(base)
    changed = 0
    for name, tensor in ours.items():
        assert_close_to_reference(tensor, reference[name], name, original.get(name))
        changed += not torch.equal(tensor, original[name])
    assert changed >= 4


@pytest.fixture(scope="module")
def dora_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("dora_engine")
    base = save_tiny_llama(root / "base", torch.float32)
    kwargs = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"])
    doras = [save_dora_adapter(base, root / f"dora{i}", torch.float32, seed=10 + i, **kwargs) for i in range(2)]
    from tests.helpers import save_peft_adapter
    lora = save_peft_adapter(base, root / "lora", torch.float32, seed=5, r=2, lora_alpha=4,
                             target_modules=["q_proj", "up_proj"])
    adapters = [*doras, lora]
    w0 = {k: v.detach().clone() for k, v in load_causal_lm(base, torch.float32).state_dict().items()}
    vectors = [{k: v - w0[k] for k, v in peft_merged_state(base, a, torch.float32).items()} for a in adapters]
    return {"root": root, "base": base, "adapters": adapters, "w0": w0, "vectors": vectors}


@pytest.mark.parametrize("method,params", [("task_arithmetic", {}), ("ties", {"density": 0.5}),
                                           ("breadcrumbs", {"density": 0.5, "gamma": 0.05})])
def test_dora_and_lora_mixed_through_every_kind_of_method(dora_world, tmp_path: Path, method: str,
                                                          params: dict) -> None:
    """Our merge == the method applied to PEFT's own task vectors (merge_and_unload_i − W0)."""
    ours = _merge(dora_world["base"], dora_world["adapters"], tmp_path / method, method=method,
                  params=tuple(params.items()))
    impl = get_method(method)
    resolved = impl.resolve_params(params)
    w0 = dora_world["w0"]
    for name, tensor in ours.items():
        updates = [(i, v[name]) for i, v in enumerate(dora_world["vectors"]) if v[name].abs().max() > 0]
        if not updates:
            assert torch.equal(tensor, w0[name])
            continue
        # Methods see the canonical [d_out, d_in] orientation: an embedding's is [hidden, vocab].
        t = (lambda x: x.T) if name.endswith("embed_tokens.weight") else (lambda x: x)
        inputs = MergeInputs(name=name, base=t(w0[name]), updates=tuple(DenseUpdate(t(u)) for _, u in updates),
                             weights=(1.0,) * len(updates), generator=torch.Generator().manual_seed(0))
        expected = w0[name] + t(impl.merge(inputs, resolved).update.dense())
        torch.testing.assert_close(tensor, expected, rtol=2e-5, atol=2e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_dora_adapter_output_needs_a_rank(dora_world, tmp_path: Path) -> None:
    recipe = Recipe(base=str(dora_world["base"]), inputs=(InputSpec(str(dora_world["adapters"][0])),), device="cpu",
                    output_format="adapter")
    with pytest.raises(PlanError, match="--rank"):
        merge(recipe, str(tmp_path / "refused"))
    merge(replace(recipe, rank=64), str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()


TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


@pytest.mark.parametrize("kind", ["qwen3_moe", "mixtral"])
def test_moe_expert_lora_through_the_engine_equals_peft(kind: str, tmp_path: Path) -> None:
    base, adapter, reference = build(kind, tmp_path, r=2, lora_alpha=4,
                                     target_modules=["q_proj"], target_parameters=TARGETS)
    ours = _merge(base, [adapter], tmp_path / "out", dtype="float32")
    original = read_model(base)
    experts_changed = sum(1 for n in ours if ".experts." in n and not torch.equal(ours[n], original[n]))
    assert experts_changed > 0
    for name, tensor in ours.items():
        assert_close_to_reference(tensor, reference[name].float(), name, original.get(name))


def test_fused_expert_parameters_are_refused_clearly(tmp_path: Path) -> None:
    base, adapter, _ = build("gpt_oss", tmp_path, r=2, lora_alpha=4, target_parameters=TARGETS)
    with pytest.raises(PlanError, match="stored fused.*not supported yet"):
        _merge(base, [adapter], tmp_path / "out")


def test_fp8_base_merges_into_a_bf16_model(tmp_path: Path) -> None:
    """Block-scaled FP8 base + LoRA → bf16 output == dequantize (whole tensor) + s·B·A, cast; the config loses
    quantization_config and transformers loads the result."""
    import json

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from streammerge.io.fp8 import dequantize_rows, read_fp8_format
    from tests.helpers import save_peft_adapter
    from tests.test_fp8 import save_fp8_llama
    base = save_fp8_llama(tmp_path / "fp8")
    bf16 = tmp_path / "bf16"  # the same architecture in bf16, only to train an adapter shape-compatible with it
    AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16).save_pretrained(bf16)
    adapter = save_peft_adapter(bf16, tmp_path / "lora", torch.float32, seed=3, r=4, lora_alpha=8,
                                target_modules=["q_proj", "down_proj"])
    out = tmp_path / "out"
    ours = _merge(base, [adapter], out)
    stored = load_file(str(base / "model.safetensors"))
    fmt = read_fp8_format(json.loads((base / "config.json").read_text()), "base")
    factors = load_file(str(adapter / "adapter_model.safetensors"))
    config = json.loads((adapter / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    assert not [n for n in ours if n.endswith("weight_scale_inv")]
    for name, tensor in ours.items():
        if name + "_scale_inv" not in stored and name.replace(".weight", ".weight_scale_inv") not in stored:
            assert torch.equal(tensor, stored[name]), name  # bf16 tensors the FP8 format left alone
            continue
        w = dequantize_rows(stored[name], stored[name.replace(".weight", ".weight_scale_inv")], 0, fmt)
        key = "base_model.model." + name.removesuffix(".weight")
        if key + ".lora_A.weight" in factors:
            w = w + scale * factors[key + ".lora_B.weight"].float() @ factors[key + ".lora_A.weight"].float()
        assert tensor.dtype == torch.bfloat16
        torch.testing.assert_close(tensor.float(), w.to(torch.bfloat16).float(), rtol=0, atol=0, msg=name)
    written = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in written and written["torch_dtype"] == "bfloat16"
    AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)


def test_extract_command_writes_an_adapter_peft_loads(tmp_path: Path) -> None:
    """`streammerge extract`: each changed matrix becomes the rank-K truncated SVD of FT − base (an exact SVD as
    the oracle), embeddings and lm_head are left out, and the output verifies (PEFT loading an extracted adapter:
    tests/test_extraction.py)."""
    import json

    from tests.helpers import run_cli
    from tools.synthetic import PRESETS, write_finetune, write_model
    base = write_model(tmp_path / "base", PRESETS["tiny"], "F32", seed=0)
    tune = write_finetune(base, tmp_path / "ft", seed=3, std=0.01)
    out = tmp_path / "lora"
    proc = run_cli("extract", "--base", str(base), "--model", str(tune), "--rank", "4", "--out", str(out),
                   "--device", "cpu", "--no-progress")
    summary = json.loads(proc.stdout)
    assert summary["format"] == "adapter" and summary["method_stats"]["truncation_error"]["max"] > 0
    w0, ft = read_model(base), read_model(tune)
    config = json.loads((out / "adapter_config.json").read_text())
    from safetensors.torch import load_file
    factors = load_file(str(out / "adapter_model.safetensors"))
    assert not any("embed_tokens" in k or "lm_head" in k for k in factors)
    checked = 0
    for key, a in factors.items():
        if not key.endswith("lora_A.weight"):
            continue
        name = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight") + ".weight"
        module = name.removesuffix(".weight")
        r = config["rank_pattern"].get(module.replace(".", "\\."), config["r"])
        scale = config["alpha_pattern"].get(module.replace(".", "\\."), config["lora_alpha"]) / r
        ours = scale * factors[key.replace("lora_A", "lora_B")] @ a
        u, s, vh = torch.linalg.svd(ft[name] - w0[name], full_matrices=False)
        best = u[:, :4] @ torch.diag(s[:4]) @ vh[:4]
        torch.testing.assert_close(ours, best, rtol=1e-4, atol=1e-5)
        checked += 1
    assert checked >= 7
    assert run_cli("verify", str(out)).returncode == 0
