"""tools/synthetic.py's DoRA adapters and low-rank full fine-tunes (benchmark inputs) are what they claim."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from streammerge import InputSpec, Recipe, merge
from tests.helpers import assert_close_to_reference, read_model
from tools.synthetic import PRESETS, write_adapter, write_finetune, write_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_synthetic_dora_adapter_is_a_real_peft_dora_adapter(tmp_path: Path) -> None:
    """PEFT loads it as DoRA and its merge_and_unload equals ours; m starts near ‖W0 + s·B·A‖ per row."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    base = write_model(tmp_path / "base", PRESETS["tiny"], "F32", seed=0)
    adapter = write_adapter(base, tmp_path / "dora", rank=4, seed=2, b_std=0.05, dora=True)
    assert json.loads((adapter / "adapter_config.json").read_text())["use_dora"] is True
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter)
    assert any("lora_magnitude_vector" in n for n, _ in model.named_parameters())
    reference = model.merge_and_unload().state_dict()
    merge(Recipe(base=str(base), inputs=(InputSpec(str(adapter)),), device="cpu"), str(tmp_path / "out"))
    ours, w0 = read_model(tmp_path / "out"), read_model(base)
    changed = 0
    for name, tensor in ours.items():
        assert_close_to_reference(tensor, reference[name], name, w0.get(name))
        changed += not torch.equal(tensor, w0[name])
    assert changed == 2 * 7
    q = "model.layers.0.self_attn.q_proj"
    factors = load_file(str(adapter / "adapter_model.safetensors"))
    lora = 2.0 * factors[f"base_model.model.{q}.lora_B.weight"] @ factors[f"base_model.model.{q}.lora_A.weight"]
    ratio = ours[q + ".weight"].norm(dim=1) / (w0[q + ".weight"] + lora).norm(dim=1)  # = m / ‖W0 + s·B·A‖
    assert 0.8 < float(ratio.min()) < 0.99 < 1.01 < float(ratio.max()) < 1.2  # 1 + 5 % noise


def test_low_rank_finetune_is_mostly_low_rank(tmp_path: Path) -> None:
    base = write_model(tmp_path / "base", PRESETS["tiny"], "F32", seed=0)
    tune = write_finetune(base, tmp_path / "ft", seed=3, std=0.01, rank=4)
    name = "model.layers.1.mlp.down_proj.weight"
    s = torch.linalg.svdvals((read_model(tune)[name] - read_model(base)[name]).double())
    energy = float((s[:4] ** 2).sum() / (s ** 2).sum())
    assert 0.9 < energy < 0.999  # rank 4 plus noise at a tenth of the entry size
