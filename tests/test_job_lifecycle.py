"""One job lifecycle for every output format: the adapter output resumes, verifies and re-runs as a
no-op like the model output, and one writer at a time holds an output directory.

Oracles: an uninterrupted run's bytes (a job SIGKILLed at several points and re-run must equal
them); ``streammerge verify``; three concurrent CLI runs into one directory against a lone run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from streammerge import InputSpec, Recipe, build_plan, run_plan
from streammerge.errors import OutputLockedError
from streammerge.jobs.journal import read_journal
from streammerge.jobs.lock import OutputLock
from streammerge.jobs.verify import verify_output
from streammerge.names import ADAPTER_WEIGHTS_NAME, JOURNAL_NAME, PARTIAL_SUFFIX
from streammerge.recipe import OUTPUT_FORMATS
from streammerge.sinks import SINKS, sink_for
from tests.helpers import REPO, run_cli
from tests.test_resume import assert_same_output, killed_run, out  # noqa: F401 - `out` is a fixture
from tools.synthetic import PRESETS, write_adapter, write_model


@pytest.fixture(scope="module")
def world(tmp_path_factory, one_torch_thread):
    root = tmp_path_factory.mktemp("lifecycle")
    base = write_model(root / "base", PRESETS["tiny"], "BF16", seed=0, max_shard_size=100_000)
    adapters = [write_adapter(base, root / "a1", rank=4, seed=1, b_std=0.05),
                write_adapter(base, root / "a2", rank=2, seed=2, b_std=0.05, targets=("q_proj", "up_proj"))]
    out = root / "out"
    recipe = Recipe(base=str(base), inputs=tuple(InputSpec(str(a), weight=w) for a, w in zip(adapters, (1.0, 0.7))),
                    method="task_arithmetic", device="cpu", output_format="adapter", out=str(out))
    plan = build_plan(recipe)
    assert len(sink_for(plan).units()) >= 2, "the test needs an adapter written in several parts"
    run_plan(plan, out)
    reference = root / "reference"
    out.rename(reference)
    return {"root": root, "base": base, "adapters": adapters, "out": out, "plan": plan, "reference": reference}


def test_every_output_format_has_a_sink():
    assert sorted(SINKS) == sorted(OUTPUT_FORMATS)


def test_adapter_output_verifies_and_leaves_no_scratch(world):
    result = verify_output(world["reference"])
    assert result.ok, result.problems
    names = sorted(p.name for p in world["reference"].iterdir())
    assert ADAPTER_WEIGHTS_NAME in names and not [n for n in names if ".part-" in n or n.endswith(PARTIAL_SUFFIX)]
    assert run_cli("verify", str(world["reference"])).returncode == 0


# Kill points in an adapter job (2+ parts, then the assembled file, config, recipe, card) and how
# many parts a re-run finds finished.
ADAPTER_KILL_POINTS = [
    ("record:1", 0),  # the job record only
    ("bytes:4", 0),  # inside the first part's header
    ("shard:1", 0),  # first part renamed into place but not journaled
    ("record:2", 1),  # first part journaled
    ("file:1", None),  # every part done, adapter_model.safetensors assembled
    ("file:2", None),  # adapter_config.json written
    ("file:4", None),  # the model card written, the completion record not yet
]


@pytest.mark.parametrize("spec,finished", ADAPTER_KILL_POINTS, ids=[p for p, _ in ADAPTER_KILL_POINTS])
def test_adapter_job_killed_anywhere_resumes_to_identical_bytes(world, out, spec, finished):
    units = len(sink_for(world["plan"]).units())
    killed_run(world["plan"], out, spec)
    state = read_journal(out)
    assert state is None or state.complete is None
    assert not out.exists() or not verify_output(out).ok
    report = run_plan(world["plan"], out)
    assert report.resumed_units == (units if finished is None else finished) and not report.already_complete
    assert_same_output(world["reference"], out)
    assert verify_output(out).ok


def test_finished_adapter_job_is_a_no_op(world, out):
    run_plan(world["plan"], out)
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()}
    report = run_plan(world["plan"], out)
    assert report.already_complete and report.files[0].file_name == ADAPTER_WEIGHTS_NAME
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()} == before
    proc = run_cli("merge", *_cli_args(world, out))
    assert proc.returncode == 0 and "nothing to do" in proc.stderr


def test_no_check_finite_reaches_the_adapter_output(world, tmp_path):
    from streammerge.execution import worker
    calls = []
    original = worker.TensorMerger.__init__

    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        calls.append(self.check_finite)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(worker.TensorMerger, "__init__", spy)
        run_plan(world["plan"], tmp_path / "o", check_finite=False)
    assert calls == [False]


def test_a_locked_directory_is_refused_at_once_naming_the_holder(world, tmp_path):
    out = tmp_path / "busy"
    with OutputLock(out):
        with pytest.raises(OutputLockedError, match=f"in use by another process \\(process {os.getpid()}"):
            run_plan(world["plan"], out)
        proc = run_cli("merge", *_cli_args(world, out), check=False)
        assert proc.returncode == 3 and "in use by another process" in proc.stderr
    assert not out.exists(), "a lock on a new directory must not leave it behind"
    run_plan(world["plan"], out)  # a released lock (or a killed holder) never blocks the job
    assert verify_output(out).ok


def _cli_args(world, out: Path) -> list[str]:
    args = ["--base", str(world["base"])]
    for adapter in world["adapters"]:
        args += ["--adapter", str(adapter)]
    return [*args, "--weight", "1.0", "--weight", "0.7", "--method", "task_arithmetic", "--device", "cpu",
            "--output-format", "adapter", "--out", str(out), "--no-progress"]


@pytest.mark.parametrize("output_format", ["adapter", "model"])
def test_three_concurrent_identical_merges_into_one_directory(world, tmp_path, output_format):
    out = tmp_path / "shared"
    args = [a if a != "adapter" else output_format for a in _cli_args(world, out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "streammerge", "merge", *args], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    for p in procs:
        p.stdout.close()
        p.stderr.close()
    for code, stderr in results:
        assert code == 0 or (code == 3 and "in use by another process" in stderr), stderr[-2000:]
    assert any(code == 0 for code, _ in results)
    assert verify_output(out).ok
    lone = tmp_path / "lone"
    recipe = replace(world["plan"].recipe, output_format=output_format, out=str(out))
    run_plan(build_plan(recipe), lone)
    for name in (ADAPTER_WEIGHTS_NAME,) if output_format == "adapter" else ("model.safetensors.index.json",):
        assert (out / name).read_bytes() == (lone / name).read_bytes()
    for shard in sorted(lone.glob("model-*.safetensors")):
        assert (out / shard.name).read_bytes() == shard.read_bytes()
    assert (out / JOURNAL_NAME).exists()


def test_each_sink_refuses_what_it_cannot_write_at_plan_time(world):
    from streammerge.errors import PlanError
    recipe = world["plan"].recipe
    with pytest.raises(PlanError, match="rank: only applies with output_format 'adapter'"):
        build_plan(replace(recipe, output_format="model", rank=4))
    with pytest.raises(PlanError, match="max_shard_size: an adapter is written as one file"):
        build_plan(replace(recipe, max_shard_size=10_000))
