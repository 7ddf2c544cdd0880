"""The output's README.md model card and config.json dtype fields."""

from __future__ import annotations

import json

import torch
import yaml

from streammerge import InputSpec, Recipe, merge
from streammerge.recipe import recipe_from_dict
from tests.helpers import read_model, save_tiny_llama
from tools.synthetic import PRESETS, write_adapter, write_model


def test_card_has_recipe_inputs_versions_and_per_module_stats(tmp_path):
    base = write_model(tmp_path / "base", PRESETS["tiny"], "BF16", seed=0)
    a1 = write_adapter(base, tmp_path / "a1", rank=4, seed=1, targets=("q_proj", "v_proj"))
    a2 = write_adapter(base, tmp_path / "a2", rank=2, seed=2, targets=("q_proj",))
    recipe = Recipe(base=str(base), inputs=(InputSpec(str(a1)), InputSpec(str(a2), weight=0.5)),
                    method="do_merging", params=(("steps", 10),), device="cpu")
    merge(recipe, str(tmp_path / "out"))
    card = (tmp_path / "out" / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "transformers" and "do_merging" in front["tags"]
    plan_inputs = json.loads((tmp_path / "out" / "streammerge_recipe.json").read_text())
    assert plan_inputs["recipe"]["inputs"][1]["weight"] == 0.5
    for text in ("# Merged model (do_merging)", str(a1), str(a2), "| 1 | adapter |", "| 0.5 | 2 |",
                 "torch 2.", "peft ", "transformers ", "huggingface_hub ", "## Method statistics",
                 "ortho_cross_gram_A_before", "<summary>Per module</summary>",
                 "| model.layers.1.self_attn.q_proj.weight |", "| model.safetensors |"):
        assert text in card, text
    per_module = [line.split(" | ")[0][2:] for line in card.splitlines() if line.startswith("| model.layers.")]
    assert per_module == [f"model.layers.{i}.self_attn.{m}_proj.weight" for i in (0, 1) for m in "qv"]
    recipe_yaml = card.split("```yaml\n")[1].split("```")[0]
    assert dict(recipe_from_dict(yaml.safe_load(recipe_yaml)).params)["steps"] == 10


def test_config_dtype_fields_follow_the_output_dtype(tmp_path):
    base = save_tiny_llama(tmp_path / "base", torch.float32)
    config = json.loads((base / "config.json").read_text())
    assert config.get("dtype") == "float32"  # transformers 5 writes `dtype`
    ft = save_tiny_llama(tmp_path / "ft", torch.float32, seed=1)
    out = tmp_path / "out"
    merge(Recipe(base=str(base), inputs=(InputSpec(str(ft), kind="model"),), dtype="bfloat16", device="cpu"), str(out))
    merged = json.loads((out / "config.json").read_text())
    assert merged["dtype"] == "bfloat16" and merged["torch_dtype"] == "bfloat16"
    assert all(t.dtype == torch.bfloat16 for t in read_model(out).values())
    from transformers import AutoModelForCausalLM
    assert AutoModelForCausalLM.from_pretrained(out, dtype="auto").dtype == torch.bfloat16
