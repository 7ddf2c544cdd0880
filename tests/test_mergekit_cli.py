"""mergekit configs through the CLI on a tiny synthetic Llama: the merged tensors against
mergekit's formulas computed here from the files, model+lora inputs, convert-config, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from streammerge.recipe import load_recipe_file
from tests.helpers import read_model, run_cli
from tests.test_mergekit_config import mk_evaluate
from tests.test_mergekit_conventions import mk_combine, mk_magnitude, mk_outliers
from tools.synthetic import PRESETS, write_adapter, write_finetune, write_model

LAYERS = PRESETS["tiny"].layers


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mk")
    base = write_model(root / "base", PRESETS["tiny"], dtype="F32")
    return {"base": base,
            "ft1": write_finetune(base, root / "ft1", seed=1, std=0.01),
            "ft2": write_finetune(base, root / "ft2", seed=2, std=0.01),
            "lora": write_adapter(base, root / "lora", rank=4, seed=3, b_std=0.05)}


def write_config(path: Path, doc: dict) -> Path:
    path.write_text(yaml.safe_dump(doc))
    return path


def t_of(name: str) -> float:
    parts = name.split(".")
    return int(parts[2]) / (LAYERS - 1) if name.startswith("model.layers.") else 0.0


@pytest.mark.parametrize("method", ["ties", pytest.param("breadcrumbs_ties", marks=pytest.mark.slow),
                                    pytest.param("task_arithmetic", marks=pytest.mark.slow)])
def test_full_fine_tunes_equal_mergekits_formula_bit_for_bit(world, tmp_path, method: str) -> None:
    weight1 = [0.2, 0.8]
    weight2 = [{"filter": "mlp", "value": 0.7}, {"value": 0.3}]
    params1 = {"weight": weight1, "density": 0.4, "gamma": 0.05}
    params2 = {"weight": weight2, "density": 0.4, "gamma": 0.05}
    doc = {"merge_method": method, "base_model": str(world["base"]), "dtype": "float32",
           "models": [{"model": str(world["base"])}, {"model": str(world["ft1"]), "parameters": params1},
                      {"model": str(world["ft2"]), "parameters": params2}]}
    if method == "task_arithmetic":
        for p in (params1, params2):
            del p["density"], p["gamma"]
    elif method == "ties":
        for p in (params1, params2):
            del p["gamma"]
    config = write_config(tmp_path / "mk.yml", doc)
    run_cli("merge", str(config), "--out", str(tmp_path / "out"), "--no-progress", "--device", "cpu")
    merged, base = read_model(tmp_path / "out"), read_model(world["base"])
    fts = [read_model(world["ft1"]), read_model(world["ft2"])]
    for name, w0 in base.items():
        deltas = [ft[name] - w0 for ft in fts]
        weights = [mk_evaluate(name, weight1, t_of(name)), mk_evaluate(name, weight2, t_of(name))]
        if method == "ties":
            expected = w0 + mk_combine([mk_magnitude(d, 0.4) for d in deltas], weights, True, True)
        elif method == "breadcrumbs_ties":
            expected = w0 + mk_combine([mk_outliers(d, 0.4, 0.05) for d in deltas], weights, True, False)
        else:
            expected = w0 + mk_combine(deltas, weights, False, False)
        assert torch.equal(merged[name], expected), name


def test_model_plus_lora_is_streamed_as_its_low_rank_update(world, tmp_path) -> None:
    doc = {"merge_method": "task_arithmetic", "base_model": str(world["base"]),
           "models": [{"model": f"{world['base']}+{world['lora']}", "parameters": {"weight": 0.5}},
                      {"model": str(world["ft1"]), "parameters": {"weight": 0.25}}]}
    config = write_config(tmp_path / "mk.yml", doc)
    run_cli("merge", str(config), "--out", str(tmp_path / "out"), "--no-progress", "--device", "cpu")
    merged, base, ft = read_model(tmp_path / "out"), read_model(world["base"]), read_model(world["ft1"])
    factors = load_file(str(world["lora"] / "adapter_model.safetensors"))
    scale = 2.0  # lora_alpha = 2r
    checked = 0
    for name, w0 in base.items():
        expected = w0 + 0.25 * (ft[name] - w0)
        module = name.removesuffix(".weight")
        a_key = f"base_model.model.{module}.lora_A.weight"
        if a_key in factors:
            expected = expected + 0.5 * scale * factors[a_key.replace("lora_A", "lora_B")] @ factors[a_key]
            checked += 1
        torch.testing.assert_close(merged[name], expected, rtol=1e-6, atol=1e-6, msg=name)
    assert checked == 7 * LAYERS


@pytest.mark.slow
def test_convert_config_prints_the_recipe_merge_runs(world, tmp_path) -> None:
    doc = {"merge_method": "dare_ties", "base_model": str(world["base"]), "parameters": {"lambda": 0.9},
           "models": [{"model": str(world["ft1"]), "parameters": {"weight": 0.5, "density": 0.6}}]}
    config = write_config(tmp_path / "mk.yml", doc)
    printed = run_cli("convert-config", str(config)).stdout
    native = write_config(tmp_path / "native.yaml", yaml.safe_load(printed))
    recipe = load_recipe_file(native)
    assert recipe.conventions == "mergekit" and dict(recipe.params)["rescale"] == "l1"
    run_cli("merge", str(config), "--out", str(tmp_path / "a"), "--no-progress", "--device", "cpu")
    run_cli("merge", str(native), "--out", str(tmp_path / "b"), "--no-progress", "--device", "cpu")
    a, b = read_model(tmp_path / "a"), read_model(tmp_path / "b")
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_refusals_exit_2_with_the_field_path(world, tmp_path) -> None:
    doc = {"merge_method": "slerp", "base_model": str(world["base"]), "models": [{"model": str(world["ft1"])}]}
    config = write_config(tmp_path / "mk.yml", doc)
    proc = run_cli("merge", str(config), "--out", str(tmp_path / "o"), check=False)
    assert proc.returncode == 2 and "merge_method: 'slerp' is not supported" in proc.stderr
    proc = run_cli("convert-config", str(config), check=False)
    assert proc.returncode == 2 and f"{config}: merge_method:" in proc.stderr
