"""The CLI end to end: a merge as a user runs it, and bad input refused before any output exists."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.helpers import read_model, run_cli
from tools.synthetic import PRESETS, write_adapter, write_model


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    base = write_model(root / "base", PRESETS["tiny"], "BF16", seed=0, max_shard_size=100_000)
    other = write_model(root / "qwen", PRESETS["tiny-qwen2"], "BF16", seed=0)
    return {
        "root": root, "base": base,
        "a1": write_adapter(base, root / "a1", rank=4, seed=1),
        "a2": write_adapter(base, root / "a2", rank=8, seed=2, targets=("q_proj", "v_proj")),
        "foreign": write_adapter(other, root / "foreign", rank=4, seed=3),
    }


def test_merge_writes_a_complete_hf_directory(world, tmp_path):
    out = tmp_path / "merged"
    proc = run_cli("merge", "--base", str(world["base"]), "--adapter", str(world["a1"]), "--adapter",
                   str(world["a2"]), "--weight", "1", "--weight", "0.5", "--param", "lambda=0.9",
                   "--out", str(out), "--no-progress")
    summary = json.loads(proc.stdout)
    assert summary["tensors_merged"] == 14 and summary["tensors_copied"] == 7
    names = sorted(p.name for p in out.iterdir())
    assert names == ["README.md", "config.json", "generation_config.json", "model-00001-of-00003.safetensors",
                     "model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors",
                     "model.safetensors.index.json", "streammerge_journal.jsonl", "streammerge_recipe.json"]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    base_index = json.loads((world["base"] / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == base_index["weight_map"]
    card = (out / "README.md").read_text()
    assert "task_arithmetic" in card and "lambda: 0.9" in card and str(world["a2"]) in card
    assert set(read_model(out)) == set(read_model(world["base"]))


def test_reshard_and_dtype(world, tmp_path):
    out = tmp_path / "merged"
    run_cli("merge", "--base", str(world["base"]), "--adapter", str(world["a1"]), "--dtype", "float32",
            "--max-shard-size", "150KB", "--out", str(out), "--no-progress")
    tensors = read_model(out)
    assert all(t.dtype == torch.float32 for t in tensors.values())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1 and all(p.stat().st_size <= 150_000 + 4096 for p in out.glob("*.safetensors"))
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"


def test_plan_is_a_dry_run(world, tmp_path):
    proc = run_cli("plan", "--base", str(world["base"]), "--adapter", str(world["a1"]))
    assert "21 tensors (14 merged)" in proc.stdout
    assert "predicted peak memory" in proc.stdout


def _refused(args: list[str], tmp_path: Path, *expected: str) -> None:
    out = tmp_path / "merged"
    proc = run_cli(*args, "--out", str(out), "--no-progress", check=False)
    assert proc.returncode == 2, proc.stderr
    for text in expected:
        assert text in proc.stderr, proc.stderr
    assert not out.exists(), "nothing may be written when the input is refused"


def test_adapter_for_another_model_lists_every_problem(world, tmp_path):
    _refused(["merge", "--base", str(world["base"]), "--adapter", str(world["foreign"])], tmp_path,
             "was made for a Qwen2ForCausalLM model but the base is a LlamaForCausalLM", "7 problem(s) found",
             "mlp.up_proj' gives an update of shape [160, 64] but base tensor")


def test_missing_adapter_and_bad_param_reported_together(world, tmp_path):
    _refused(["merge", "--base", str(world["base"]), "--adapter", str(tmp_path / "nope"),
              "--param", "lamda=1"], tmp_path,
             "2 problem(s) found", "has no parameter(s) 'lamda'; it takes: lambda", "is not a directory")


def test_pickle_only_adapter_is_refused(world, tmp_path):
    adapter = tmp_path / "pickled"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text((world["a1"] / "adapter_config.json").read_text())
    (adapter / "adapter_model.bin").write_bytes(b"not unpickled")
    _refused(["merge", "--base", str(world["base"]), "--adapter", str(adapter)], tmp_path,
             "has only adapter_model.bin (a pickle")


def test_weight_count_must_match_inputs(world, tmp_path):
    _refused(["merge", "--base", str(world["base"]), "--adapter", str(world["a1"]), "--weight", "1",
              "--weight", "2"], tmp_path, "2 --weight value(s) for 1 input(s)")


def test_non_empty_output_directory_is_refused(world, tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    proc = run_cli("merge", "--base", str(world["base"]), "--adapter", str(world["a1"]), "--out", str(out),
                   "--no-progress", check=False)
    assert proc.returncode == 3 and "is not empty" in proc.stderr
    assert (out / "precious.txt").read_text() == "keep me"


def test_methods_lists_parameters():
    proc = run_cli("methods")
    assert "task_arithmetic" in proc.stdout and "lambda (float, default 1.0)" in proc.stdout


def test_max_memory_below_the_predicted_peak_is_refused(world, tmp_path):
    _refused(["merge", "--base", str(world["base"]), "--adapter", str(world["a1"]), "--method", "ties",
              "--max-memory", "200MB"], tmp_path,
             "max_memory: the predicted peak is", "but --max-memory is 191 MiB", "the largest working set is tensor")


def test_plan_time_estimate_prices_the_orthogonalization_search_space(world):
    def estimate(*params: str) -> float:
        args = ["plan", "--base", str(world["base"]), "--adapter", str(world["a1"]), "--adapter", str(world["a2"]),
                "--method", "do_merging"]
        for p in params:
            args += ["--param", p]
        line = next(x for x in run_cli(*args).stdout.splitlines() if x.startswith("time: roughly"))
        return float(line.split()[2])

    # Many steps, so the tiny model's estimate is not rounded away.
    many = "steps=100000"
    assert estimate("orthogonalize=false", many) < estimate(many) < estimate("search_space=full", many)


def test_importing_streammerge_makes_idle_openmp_threads_sleep():
    import os
    import subprocess
    import sys

    code = "import os, streammerge; print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip() == "PASSIVE"
    env["OMP_WAIT_POLICY"] = "ACTIVE"  # the user's choice wins
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip() == "ACTIVE"
