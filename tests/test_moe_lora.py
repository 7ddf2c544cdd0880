"""PEFT target_parameters on fused MoE experts: our per-expert updates == PEFT merge_and_unload."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from streammerge.errors import UnsupportedAdapterError
from streammerge.inputs.lora import load_lora_adapter
from streammerge.inputs.moe import expert_part_factors, expert_update_factors, fused_expert_delta, parse_expert_loras
from streammerge.inputs.peft_config import TARGET_PARAMETERS_FEATURE, parse_lora_settings, read_lora_settings
from streammerge.io.reader import open_checkpoint
from tests.helpers import load_adapter_file, read_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

COMMON = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              head_dim=8, num_experts_per_tok=2)
MODELS = {
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(moe_intermediate_size=24, intermediate_size=40,
                                                              num_experts=4)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(intermediate_size=24, num_local_experts=4)),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM", dict(intermediate_size=24, num_local_experts=4,
                                                         layer_types=["full_attention"] * 2)),
}
TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def build(kind: str, root: Path, **lora_kwargs) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    """A tiny real MoE model, a random target_parameters adapter for it, and PEFT's merged checkpoint."""
    import transformers
    from peft import LoraConfig, PeftModel, get_peft_model
    config_cls, model_cls, extra = MODELS[kind]
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**COMMON, **extra))
    with torch.no_grad():  # gpt-oss leaves some expert parameters uninitialised
        for param in model.parameters():
            param.copy_(torch.randn(param.shape) * 0.05)
    base = root / "base"
    model.save_pretrained(base)
    peft_model = get_peft_model(getattr(transformers, model_cls).from_pretrained(base),
                                LoraConfig(**{"target_modules": [], **lora_kwargs}))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    adapter = root / "adapter"
    peft_model.save_pretrained(adapter)
    merged = PeftModel.from_pretrained(getattr(transformers, model_cls).from_pretrained(base), adapter)
    merged.merge_and_unload().save_pretrained(root / "merged")  # written back in the checkpoint's own layout
    return base, adapter, read_model(root / "merged")


def ours(base: Path, adapter: Path) -> tuple[dict[str, torch.Tensor], tuple]:
    layout = open_checkpoint(base)
    base_infos = {n: layout.info(n) for n in layout.tensor_names}
    settings = read_lora_settings(adapter / "adapter_config.json", accept=(TARGET_PARAMETERS_FEATURE,))
    adapter_layout = open_checkpoint(adapter / "adapter_model.safetensors")
    adapter_infos = {n: adapter_layout.info(n) for n in adapter_layout.tensor_names}
    model_type = json.loads((base / "config.json").read_text())["model_type"]
    problems: list[str] = []
    loras = parse_expert_loras(adapter_infos, settings, base_infos, model_type, str(adapter), problems)
    assert problems == []
    factors, weights = load_adapter_file(adapter), read_model(base)
    out = dict(weights)
    for lora in loras:
        a, b = factors[lora.a_key].float(), factors[lora.b_key].float()
        for target in lora.targets:
            if target.expert is None:  # fused on disk: row blocks are expert ranges (here 3 + 1)
                e = lora.num_experts
                delta = torch.cat([fused_expert_delta(a, b, lora.scale, e, s, min(s + 3, e), lora.transposed)
                                   for s in range(0, e, 3)])
                for expert in range(e):  # the same, one low-rank expert matrix at a time
                    up, down = expert_update_factors(lora, a, b, expert)
                    stored = (up @ down).T if lora.transposed else up @ down
                    torch.testing.assert_close(stored, delta[expert], rtol=1e-6, atol=1e-7)
            else:
                up, down = expert_part_factors(lora, a, b, target)
                delta = up @ down
            out[target.name] = weights[target.name] + delta
    return out, loras


@pytest.mark.parametrize("kind", list(MODELS))
def test_target_parameters_equal_peft_merge_and_unload(kind: str, tmp_path: Path) -> None:
    base, adapter, reference = build(kind, tmp_path, r=3, lora_alpha=6, target_parameters=TARGETS)
    merged, loras = ours(base, adapter)
    assert {lora.param for lora in loras} == {"gate_up_proj", "down_proj"} and len(loras) == 4
    assert all(lora.transposed == (kind == "gpt_oss") for lora in loras)
    changed = {t.name for lora in loras for t in lora.targets}
    assert len(changed) == (4 if kind == "gpt_oss" else 2 * 4 * 3)  # fused tensors / per-expert parts
    assert set(merged) == set(reference)
    for name, tensor in reference.items():
        torch.testing.assert_close(merged[name], tensor, rtol=1e-6, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
        if name in changed:
            assert not torch.equal(tensor, read_model(base)[name])


def test_rslora_rank_pattern_and_one_parameter(tmp_path: Path) -> None:
    base, adapter, reference = build("qwen3_moe", tmp_path, r=2, lora_alpha=3, use_rslora=True,
                                     rank_pattern={"down_proj": 4}, target_parameters=["mlp.experts.down_proj"])
    merged, loras = ours(base, adapter)
    assert {lora.rank for lora in loras} == {4} and {lora.param for lora in loras} == {"down_proj"}
    for name, tensor in reference.items():
        torch.testing.assert_close(merged[name], tensor, rtol=1e-6, atol=1e-6)


def test_attention_lora_and_expert_lora_in_one_adapter(tmp_path: Path) -> None:
    """inputs.lora reads the Linear modules, inputs.moe the ParamWrappers; together they are PEFT's merge."""
    base, adapter, reference = build("qwen3_moe", tmp_path, r=2, lora_alpha=2, target_modules=["q_proj"],
                                     target_parameters=TARGETS)
    with pytest.raises(UnsupportedAdapterError, match="target_parameters"):
        load_lora_adapter(adapter, open_checkpoint(base).tensor_names, [])
    problems: list[str] = []
    parsed = load_lora_adapter(adapter, open_checkpoint(base).tensor_names, problems,
                               accept=(TARGET_PARAMETERS_FEATURE,))
    assert problems == [] and sorted(m.target for m in parsed.modules) == [
        f"model.layers.{i}.self_attn.q_proj.weight" for i in range(2)]
    merged, loras = ours(base, adapter)
    factors = load_adapter_file(adapter)
    for module in parsed.modules:
        merged[module.target] = merged[module.target] + module.scale * factors[module.b_key] @ factors[module.a_key]
    assert len(loras) == 4
    for name, tensor in reference.items():
        torch.testing.assert_close(merged[name], tensor, rtol=1e-6, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("field,value", [("use_dora", True), ("lora_bias", True), ("fan_in_fan_out", True),
                                         ("lora_dropout", 0.1)])
def test_what_peft_refuses_for_target_parameters_is_refused(field: str, value: object) -> None:
    doc = {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_parameters": TARGETS, field: value}
    with pytest.raises(UnsupportedAdapterError, match=f"{field}=.*ParamWrapper"):
        parse_lora_settings(Path("/a"), doc, accept=(TARGET_PARAMETERS_FEATURE, "use_dora"))


def test_unknown_parameter_and_wrong_shapes_are_problems(tmp_path: Path) -> None:
    base, adapter, _ = build("qwen3_moe", tmp_path, r=2, lora_alpha=2, target_parameters=TARGETS)
    layout = open_checkpoint(base)
    base_infos = {n: layout.info(n) for n in layout.tensor_names}
    adapter_layout = open_checkpoint(adapter / "adapter_model.safetensors")
    infos = {n: adapter_layout.info(n) for n in adapter_layout.tensor_names}
    doc = json.loads((adapter / "adapter_config.json").read_text())
    wrong_rank = parse_lora_settings(adapter, {**doc, "r": 3}, accept=(TARGET_PARAMETERS_FEATURE,))
    problems: list[str] = []
    assert parse_expert_loras(infos, wrong_rank, base_infos, "qwen3_moe", "a", problems) == ()
    assert len(problems) == 4 and all("do not fit 4 experts" in p for p in problems)
    one_target = parse_lora_settings(adapter, {**doc, "target_parameters": TARGETS[:1]},
                                     accept=(TARGET_PARAMETERS_FEATURE,))
    problems = []
    assert parse_expert_loras(infos, one_target, base_infos, "qwen3_moe", "a", problems) == ()
    assert len(problems) == 2 and all("2 target_parameters wrapper(s)" in p for p in problems)
