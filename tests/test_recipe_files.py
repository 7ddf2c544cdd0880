"""Recipe files: YAML in, the same merge as the flags, per-layer / per-module weights and filters
applied per tensor, every problem reported at once with its YAML path, the saved recipe loadable back."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from streammerge import InputSpec, Recipe, merge
from streammerge.errors import PlanError
from streammerge.recipe import WeightOverride, interpolate, load_recipe_file, recipe_from_dict
from tests.helpers import assert_close_to_reference, load_adapter_file, read_model, read_raw, run_cli
from tools.synthetic import PRESETS, write_adapter, write_model

LAYERS = 3


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("recipes")
    base = write_model(root / "base", replace(PRESETS["tiny"], layers=LAYERS), "BF16", seed=0, max_shard_size=100_000)
    return {"root": root, "base": base,
            "a1": write_adapter(base, root / "a1", rank=4, seed=1),
            "a2": write_adapter(base, root / "a2", rank=2, seed=2, targets=("q_proj", "up_proj"))}


def _write(path: Path, doc: dict) -> Path:
    path.write_text(yaml.safe_dump(doc))
    return path


def test_recipe_file_equals_flags_and_flags_override(world, tmp_path):
    recipe = _write(tmp_path / "r.yaml", {
        "base": str(world["base"]), "method": "task_arithmetic", "params": {"lambda": 0.5},
        "inputs": [str(world["a1"]), {"path": str(world["a2"]), "weight": 0.25}], "seed": 3})
    run_cli("merge", str(recipe), "--out", str(tmp_path / "file"), "--no-progress")
    run_cli("merge", "--base", str(world["base"]), "--adapter", str(world["a1"]), "--adapter", str(world["a2"]),
            "--weight", "1", "--weight", "0.25", "--param", "lambda=0.5", "--out", str(tmp_path / "flags"),
            "--no-progress")
    assert read_raw(tmp_path / "file") == read_raw(tmp_path / "flags")
    # flags override the file: --param overlays params, --dtype replaces dtype
    proc = run_cli("merge", str(recipe), "--param", "lambda=1", "--dtype", "float32",
                   "--out", str(tmp_path / "over"), "--no-progress")
    assert "lambda: 1.0" in proc.stderr and "dtype: float32" in proc.stderr  # the echoed, resolved recipe
    saved = load_recipe_file(tmp_path / "over" / "streammerge_recipe.json")
    assert dict(saved.params) == {"lambda": 1.0, "normalize": "none",  # every parameter, defaults resolved
                                  "compute_dtype": "float32", "load_dtype": "float32"}
    assert saved.dtype == "float32" and saved.seed == 3
    assert all(t.dtype == torch.float32 for t in read_model(tmp_path / "over").values())


def test_saved_recipe_is_yaml_loadable_and_reruns_identically(world, tmp_path):
    recipe = Recipe(base=str(world["base"]), method="do_merging", params=(("steps", 5),), device="cpu",
                    inputs=(InputSpec(str(world["a1"]), weight=(0.5, 1.0)), InputSpec(str(world["a2"]))))
    merge(recipe, str(tmp_path / "first"))
    saved = tmp_path / "first" / "streammerge_recipe.json"
    loaded = load_recipe_file(saved)
    assert loaded.inputs == recipe.inputs and loaded.method == "do_merging"
    assert dict(loaded.params)["steps"] == 5 and "mu" in dict(loaded.params)  # every parameter spelled out
    card = (tmp_path / "first" / "README.md").read_text()
    yaml_block = card.split("```yaml\n")[1].split("```")[0]
    assert recipe_from_dict(yaml.safe_load(yaml_block)) == loaded  # the card's recipe is the same recipe
    merge(replace(loaded, out=None), str(tmp_path / "second"))
    assert read_raw(tmp_path / "second") == read_raw(tmp_path / "first")


def _expected(world, base: dict, weight_of) -> dict[str, torch.Tensor]:
    """Independent oracle: W0 + w(tensor) · s · B @ A for adapter a1 (s = alpha / r = 2)."""
    factors = load_adapter_file(world["a1"])
    out = {k: v.float().clone() for k, v in base.items()}
    for key, a in factors.items():
        if ".lora_A." in key:
            name = key.removeprefix("base_model.model.").split(".lora_A.")[0] + ".weight"
            w = weight_of(name)
            if w:
                out[name] += w * 2.0 * (factors[key.replace("lora_A", "lora_B")].float() @ a.float())
    return {k: v.to(base[k].dtype) for k, v in out.items()}


def test_per_layer_weights_overrides_and_filters_apply_per_tensor(world, tmp_path):
    doc = {"base": str(world["base"]), "inputs": [{
        "path": str(world["a1"]),
        "weight": [0.0, 1.0],  # layers 0, 1, 2 -> 0, 0.5, 1
        "overrides": [{"match": "*.mlp.down_proj.*", "weight": 0.25},
                      {"match": "*.mlp.*", "weight": [2.0, 0.0]}],  # first match wins
        "exclude": ["*.k_proj.*"]}]}
    out = tmp_path / "out"
    run_cli("merge", str(_write(tmp_path / "r.yaml", doc)), "--out", str(out), "--no-progress")

    def weight_of(name: str) -> float:
        layer = int(name.split(".")[2])
        if ".k_proj." in name:
            return 0.0
        if ".down_proj." in name:
            return 0.25
        if ".mlp." in name:
            return [2.0, 1.0, 0.0][layer]
        return [0.0, 0.5, 1.0][layer]

    base = read_model(world["base"])
    expected = _expected(world, base, weight_of)
    ours = read_model(out)
    for name, tensor in ours.items():
        assert_close_to_reference(tensor, expected[name], name, base[name])
    assert torch.equal(ours["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(ours["model.layers.2.self_attn.k_proj.weight"], base["model.layers.2.self_attn.k_proj.weight"])


def test_every_problem_in_a_file_is_reported_with_its_path(world, tmp_path):
    bad = _write(tmp_path / "bad.yaml", {
        "base": str(world["base"]), "methd": "ties", "seed": "x", "max_shard_size": "5 parsecs",
        "inputs": [{"path": str(world["a1"]), "weight": "heavy", "include": "q_proj"},
                   {"kind": "model"},
                   {"path": str(world["a2"]), "overrides": [{"match": "*", "weight": [1, "x"]}]}]})
    proc = run_cli("merge", str(bad), "--out", str(tmp_path / "o"), "--no-progress", check=False)
    assert proc.returncode == 2 and not (tmp_path / "o").exists()
    for text in ("7 problem(s) found", "methd: unknown field; known fields: base, inputs",
                 "seed: expected integer, got 'x'", "max_shard_size: cannot read size '5 parsecs'",
                 "inputs[0].weight: expected number or a list of numbers, got 'heavy'",
                 "inputs[0].include: expected a list of strings, got 'q_proj'", "inputs[1].path: missing",
                 "inputs[2].overrides[0].weight[1]: expected number, got 'x'"):
        assert text in proc.stderr, (text, proc.stderr)


def test_semantic_and_file_problems_are_reported_together(world, tmp_path):
    doc = {"base": str(world["base"]), "method": "ties", "params": {"densty": 0.5}, "output_format": "zip",
           "inputs": [{"path": str(world["a1"]), "include": ["*.q_prj.*"]}, {"path": str(tmp_path / "missing")}]}
    with pytest.raises(PlanError) as info:
        from streammerge import build_plan
        build_plan(load_recipe_file(_write(tmp_path / "r.yaml", doc)))
    text = str(info.value)
    assert "params: method 'ties' has no parameter(s) 'densty'" in text
    assert "output_format: 'zip' must be one of ['model', 'adapter', 'gguf']" in text
    assert "is not a directory" in text
    assert len(info.value.problems) == 3  # the include typo waits until the inputs themselves are sound
    doc["params"], doc["output_format"] = {}, "model"
    doc["inputs"] = doc["inputs"][:1]
    with pytest.raises(PlanError, match=r"inputs\[0\].include: pattern '\*.q_prj.\*' matches no tensor"):
        build_plan(load_recipe_file(_write(tmp_path / "r.yaml", doc)))


def test_plan_command_reads_a_recipe_and_estimates(world, tmp_path):
    recipe = _write(tmp_path / "r.yaml", {"base": str(world["base"]), "inputs": [str(world["a1"])],
                                          "out": str(tmp_path / "never")})
    proc = run_cli("plan", str(recipe))
    for text in ("resolved recipe:", "read: base", "KiB read", "merge: 21 tensors; copy unchanged: 9",
                 "write: 30 tensors (21 merged)", "predicted peak memory", "free at", "time: roughly"):
        assert text in proc.stdout, (text, proc.stdout)
    assert not (tmp_path / "never").exists()


weights = st.one_of(st.floats(-4, 4, allow_nan=False),
                    st.lists(st.floats(-4, 4, allow_nan=False), min_size=1, max_size=4).map(tuple))
specs = st.builds(InputSpec, path=st.text(min_size=1, max_size=8), kind=st.sampled_from(["adapter", "model"]),
                  weight=weights, revision=st.none() | st.text(max_size=6),
                  overrides=st.lists(st.builds(WeightOverride, match=st.text(min_size=1, max_size=6), weight=weights),
                                     max_size=2).map(tuple),
                  include=st.lists(st.text(max_size=5), max_size=2).map(tuple))


@settings(max_examples=60, deadline=None)
@given(inputs=st.lists(specs, max_size=3).map(tuple), seed=st.integers(0, 2**31),
       rank=st.none() | st.integers(1, 512), params=st.dictionaries(st.sampled_from(["lambda", "density"]),
                                                                      st.floats(0, 1), max_size=2))
def test_recipe_round_trips_through_yaml_and_json(inputs, seed, rank, params):
    recipe = Recipe(base="b", inputs=inputs, seed=seed, rank=rank, params=tuple(sorted(params.items())))
    assert recipe_from_dict(yaml.safe_load(yaml.safe_dump(recipe.to_dict()))) == recipe
    assert recipe_from_dict(json.loads(json.dumps(recipe.to_dict()))) == recipe


def test_interpolation_spreads_values_from_first_to_last_layer():
    assert [interpolate((0.0, 1.0), layer, 5) for layer in range(5)] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert [interpolate((1.0, 0.0, 1.0), layer, 3) for layer in range(3)] == [1.0, 0.0, 1.0]
    assert interpolate((0.3, 0.9), None, 5) == 0.3 and interpolate(0.7, 2, 5) == 0.7
