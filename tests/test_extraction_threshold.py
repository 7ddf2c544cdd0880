"""`streammerge extract --min-relative-norm X`: modules with ‖FT − B‖_F <= X·‖B‖_F are left out and reported."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from streammerge import InputSpec, Recipe, build_plan
from streammerge.errors import PlanError
from streammerge.io.writer import save_tensors
from tests.helpers import read_model, run_cli
from tools.synthetic import PRESETS, write_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def uneven_finetune(base: Path, out: Path) -> tuple[Path, dict[str, float]]:
    """FT = base + noise whose size differs by module: q_proj 5 %, v_proj and the final norm 1 %, every other
    matrix 0.01 %, the other norms unchanged."""
    weights = read_model(base)
    gen = torch.Generator().manual_seed(11)
    ratios = {}
    tuned = {}
    for name, w in weights.items():
        if "embed" not in name and "lm_head" not in name:
            size = 0.05 if "q_proj" in name else 0.01 if "v_proj" in name or name == "model.norm.weight" else 1e-4
            size = 0.0 if w.ndim == 1 and name != "model.norm.weight" else size
            noise = torch.randn(w.shape, generator=gen)
            tuned[name] = w + noise * (size * float(w.norm()) / float(noise.norm()))
            ratios[name] = float((tuned[name] - w).double().norm() / w.double().norm())  # the oracle: from the files
        else:
            tuned[name] = w
    out.mkdir()
    save_tensors(out / "model.safetensors", tuned)
    (out / "config.json").write_bytes((base / "config.json").read_bytes())
    return out, ratios


def test_min_relative_norm_skips_small_modules_and_reports_them(tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    base = write_model(tmp_path / "base", PRESETS["tiny"], "F32", seed=0)
    tune, ratios = uneven_finetune(base, tmp_path / "ft")
    out = tmp_path / "lora"
    proc = run_cli("extract", "--base", str(base), "--model", str(tune), "--rank", "4", "--out", str(out),
                   "--min-relative-norm", "0.005", "--device", "cpu", "--no-progress")
    summary = json.loads(proc.stdout)
    expected_skipped = sorted(n for n, r in ratios.items() if r <= 0.005)
    assert len(expected_skipped) == 2 * (5 + 2)  # k, o, gate, up, down and both norms in both layers
    assert summary["skipped_below_min_relative_norm"] == expected_skipped
    stats = summary["method_stats"]["relative_norm"]
    assert stats["min"] == 0 and stats["max"] == pytest.approx(0.05, rel=1e-3)
    factors = load_file(str(out / "adapter_model.safetensors"))
    lora = {k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for k in factors if ".lora_" in k}
    assert lora == {n.removesuffix(".weight") for n in ratios if "proj" in n and n not in expected_skipped}
    config = json.loads((out / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == sorted(lora)
    assert config["modules_to_save"] == ["model.norm"]  # changed by 1 %; the unchanged norms are left out
    card = (out / "README.md").read_text()
    assert "relative_norm" in card
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), out)
    merged = model.merge_and_unload().state_dict()
    w0 = read_model(base)
    for name in expected_skipped:
        assert torch.equal(merged[name], w0[name]), name


def test_min_relative_norm_is_checked() -> None:
    with pytest.raises(PlanError, match="min_relative_norm: only applies with output_format 'adapter'"):
        build_plan(Recipe(base="x", inputs=(InputSpec("y"),), min_relative_norm=0.01))
    with pytest.raises(PlanError, match="min_relative_norm: must be a number >= 0"):
        build_plan(Recipe(base="x", inputs=(InputSpec("y"),), output_format="adapter", min_relative_norm=-1.0))
