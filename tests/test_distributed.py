"""Distributed jobs through ``torchrun`` (CPU, gloo): the bytes of a single-process run, resumable, no hangs.

Every job is a real ``python -m torch.distributed.run … -m streammerge merge …`` in a subprocess:
2 ranks on one node, and 2 single-rank "nodes" meeting over 127.0.0.1.  The oracle is the
single-process run of the same recipe into the same directory path (the card records the path).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from streammerge import InputSpec, Recipe, build_plan, cli, run_plan
from streammerge.execution.distributed import TIMEOUT_ENV, describe_split, detect_ranks, split_units
from streammerge.jobs import faults
from streammerge.jobs.journal import is_rank_journal, read_journal
from streammerge.jobs.verify import verify_output
from streammerge.names import JOURNAL_NAME, MODEL_CARD_NAME, RANK_JOURNAL_TEMPLATE
from streammerge.sinks import sink_for
from tests.helpers import REPO, run_cli
from tests.test_resume import assert_same_output
from tools.synthetic import PRESETS, write_adapter, write_model

SHARD_SIZE = 90_000  # the tiny bf16 model becomes 4 shards: 2 per rank
METHODS = {"task_arithmetic": (), "do_merging": (("steps", 20),), "dare_linear": ()}


def _recipe(world: dict, method: str, out: Path, **kw) -> Recipe:
    kw.setdefault("max_shard_size", None if kw.get("output_format") == "adapter" else SHARD_SIZE)
    return Recipe(base=str(world["base"]), inputs=tuple(InputSpec(str(a), weight=w) for a, w in
                                                          zip(world["adapters"], (1.0, 0.7))),
                  method=method, params=METHODS.get(method, ()), seed=7, device="cpu", out=str(out), **kw)


def _args(recipe: Recipe) -> list[str]:
    """The same job on the command line."""
    args = ["merge", "--base", recipe.base, "--method", recipe.method, "--seed", "7", "--device", "cpu",
            "--output-format", recipe.output_format, "--out", recipe.out, "--no-progress"]
    if recipe.max_shard_size is not None:
        args += ["--max-shard-size", str(recipe.max_shard_size)]
    for spec in recipe.inputs:
        args += ["--adapter", spec.path, "--weight", str(spec.weight)]
    return args + [f"--param={k}={v}" for k, v in recipe.params]


@pytest.fixture(scope="module")
def world(tmp_path_factory, one_torch_thread):
    root = tmp_path_factory.mktemp("distributed")
    base = write_model(root / "base", PRESETS["tiny"], "BF16", seed=0, max_shard_size=100_000)
    adapters = [write_adapter(base, root / "a1", rank=4, seed=1, b_std=0.05),
                write_adapter(base, root / "a2", rank=2, seed=2, b_std=0.05, targets=("q_proj", "up_proj"))]
    return {"root": root, "base": base, "adapters": adapters, "out": root / "out", "references": {}}


def reference(world: dict, method: str, output_format: str = "model") -> Path:
    """The single-process output of ``method`` (computed once)."""
    key = (method, output_format)
    if key not in world["references"]:
        shutil.rmtree(world["out"], ignore_errors=True)
        # Through the CLI, as the torchrun jobs get it (a Recipe built here could type a parameter differently).
        assert cli.main(_args(_recipe(world, method, world["out"], output_format=output_format))) == 0
        world["references"][key] = world["out"].rename(world["root"] / f"ref-{method}-{output_format}")
    return world["references"][key]


@pytest.fixture
def out(world):
    shutil.rmtree(world["out"], ignore_errors=True)
    yield world["out"]
    shutil.rmtree(world["out"], ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", TIMEOUT_ENV: "20", **extra}
    for name in (faults.KILL_ENV, faults.KILL_RANK_ENV, faults.FAULT_ENV):
        if name not in extra:
            env.pop(name, None)
    return env


def torchrun(args: list[str], nodes: int = 1, env: dict[str, str] | None = None,
             timeout: float = 120) -> list[subprocess.CompletedProcess]:
    """Run ``streammerge`` under torchrun: 2 ranks on one node, or ``nodes`` single-rank nodes on 127.0.0.1."""
    port = _free_port()
    launcher = [sys.executable, "-m", "torch.distributed.run", "--master-addr", "127.0.0.1",
                "--master-port", str(port)]
    if nodes == 1:
        commands = [launcher + ["--nproc-per-node", "2"]]
    else:
        commands = [launcher + ["--nnodes", str(nodes), "--nproc-per-node", "1", "--node-rank", str(i)]
                    for i in range(nodes)]
    procs = [subprocess.Popen(c + ["-m", "streammerge", *args], cwd=REPO, env=env or _env(), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for c in commands]
    results = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=timeout)
        results.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return results


def _ok(results: list[subprocess.CompletedProcess]) -> None:
    for r in results:
        assert r.returncode == 0, r.stderr[-3000:]


# --- the split -------------------------------------------------------------------------------

def test_split_by_bytes_is_a_function_of_the_plan_and_world_size(world):
    units = sink_for(build_plan(_recipe(world, "task_arithmetic", world["out"]))).units()
    for n in (1, 2, 3, 7):
        split = split_units(units, n)
        assert sorted(i for part in split for i in part) == list(range(len(units))), "every unit, exactly once"
        assert split == split_units(units, n)
    assert split_units(units, 1) == [tuple(range(len(units)))]
    sizes = [sum(units[i].size for i in part) for part in split_units(units, 2)]
    assert max(sizes) - min(sizes) <= max(u.size for u in units), "largest-first: within one unit of even"
    assert split_units(units, 7)[6] == (), "more ranks than units: the last ones idle"
    assert describe_split(units, 2).count("\n  rank ") == 2


def test_rank_detection_from_torchrun_env():
    assert detect_ranks({}) is None
    assert detect_ranks({"RANK": "0", "WORLD_SIZE": "1"}) is None, "one rank is a single process"
    info = detect_ranks({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    assert (info.rank, info.world_size, info.local_rank) == (1, 2, 1)
    with pytest.raises(Exception, match="outside WORLD_SIZE"):
        detect_ranks({"RANK": "2", "WORLD_SIZE": "2"})


def test_plan_previews_the_per_rank_split(world):
    result = run_cli(*["plan" if a == "merge" else a for a in _args(_recipe(world, "task_arithmetic", world["out"]))
                       if a != "--no-progress"], "--world-size", "2")
    assert "per-rank split (world size 2" in result.stdout
    assert "rank 0: 2 unit(s)" in result.stdout and "rank 1: 2 unit(s)" in result.stdout


# --- same bytes as one process ---------------------------------------------------------------

TOPOLOGIES = [pytest.param("dare_linear", 1, id="dare_linear-2ranks"),
              pytest.param("dare_linear", 2, id="dare_linear-2nodes"),
              pytest.param("task_arithmetic", 1, id="task_arithmetic-2ranks", marks=pytest.mark.slow),
              pytest.param("task_arithmetic", 2, id="task_arithmetic-2nodes", marks=pytest.mark.slow),
              pytest.param("do_merging", 1, id="do_merging-2ranks", marks=pytest.mark.slow),
              pytest.param("do_merging", 2, id="do_merging-2nodes", marks=pytest.mark.slow)]


@pytest.mark.parametrize("method,nodes", TOPOLOGIES)
def test_distributed_output_is_byte_identical(world, out, method, nodes, capsys):
    expected = reference(world, method)
    results = torchrun(_args(_recipe(world, method, out)), nodes=nodes)
    _ok(results)
    assert_same_output(expected, out)
    assert not any(is_rank_journal(p.name) for p in out.iterdir()), "rank journals are folded in"
    assert verify_output(out).ok
    capsys.readouterr()
    assert cli.main(_args(_recipe(world, method, out))) == 0
    assert json.loads(capsys.readouterr().out)["already_complete"], "a second (single-process) run is a no-op"


def test_distributed_adapter_output_is_byte_identical(world, out):
    expected = reference(world, "task_arithmetic", "adapter")
    recipe = _recipe(world, "task_arithmetic", out, output_format="adapter")
    assert len(sink_for(build_plan(recipe)).units()) == 3, "one part per base shard: both ranks write parts"
    _ok(torchrun(_args(recipe)))
    assert_same_output(expected, out)
    assert verify_output(out).ok


# --- faults ----------------------------------------------------------------------------------

def test_killed_distributed_job_is_finished_by_one_process(world, out):
    expected = reference(world, "dare_linear")
    recipe = _recipe(world, "dare_linear", out)
    env = _env(**{faults.KILL_ENV: "record:1", faults.KILL_RANK_ENV: "1"})  # rank 1 dies after its first unit
    results = torchrun(_args(recipe), env=env)
    assert all(r.returncode != 0 for r in results)
    state = read_journal(out)
    assert state is not None and state.complete is None
    assert any(is_rank_journal(p.name) for p in out.iterdir()), "rank 1 journaled a unit before it died"
    report = run_plan(build_plan(recipe), out)  # world size 1
    assert report.resumed_units >= 1 and not report.already_complete
    assert not any(is_rank_journal(p.name) for p in out.iterdir()), "the resumed job folded rank 1's journal in"
    assert_same_output(expected, out)
    assert verify_output(out).ok


def test_rank_journals_are_read_and_folded_in_on_resume(world, out):
    """A job whose rank 1 journaled two units (its file torn by a kill mid-append) resumes in one process."""
    expected = reference(world, "dare_linear")
    shutil.copytree(expected, out)
    journal = out / JOURNAL_NAME
    lines = journal.read_bytes().splitlines(keepends=True)  # job, 4 units, complete
    assert len(lines) == 6
    journal.write_bytes(b"".join(lines[:3]))
    (out / RANK_JOURNAL_TEMPLATE.format(rank=1)).write_bytes(b"".join(lines[3:5]) + b'{"record":"un')
    (out / MODEL_CARD_NAME).unlink()
    state = read_journal(out)
    assert len(state.units) == 4 and state.complete is None
    report = run_plan(build_plan(_recipe(world, "dare_linear", out)), out)
    assert report.resumed_units == 4 and not report.already_complete
    assert not any(is_rank_journal(p.name) for p in out.iterdir())
    assert_same_output(expected, out)


@pytest.mark.slow
def test_a_rank_killed_on_another_node_is_noticed(world, out):
    """No launcher kills rank 0 for us here: its wait notices rank 1's heartbeat stopped."""
    env = _env(**{faults.KILL_ENV: "record:1", faults.KILL_RANK_ENV: "1", TIMEOUT_ENV: "8"})
    started = time.monotonic()
    results = torchrun(_args(_recipe(world, "task_arithmetic", out)), nodes=2, env=env, timeout=90)
    assert time.monotonic() - started < 60
    assert all(r.returncode != 0 for r in results), [r.returncode for r in results]


def test_lock_probe_tells_whether_rank_0_still_holds_the_directory(tmp_path):
    from streammerge.jobs.lock import OutputLock, is_locked
    with OutputLock(tmp_path):
        assert is_locked(tmp_path)
    assert not is_locked(tmp_path)


@pytest.mark.parametrize("failing_rank,nodes", [pytest.param("1", 2, id="rank1-2nodes"),
                                                pytest.param("0", 1, id="rank0-2ranks", marks=pytest.mark.slow)])
def test_a_failing_rank_stops_every_rank(world, out, failing_rank, nodes):
    env = _env(**{faults.KILL_ENV: "shard:1", faults.KILL_RANK_ENV: failing_rank, faults.FAULT_ENV: "raise"})
    started = time.monotonic()
    results = torchrun(_args(_recipe(world, "task_arithmetic", out)), nodes=nodes, env=env, timeout=90)
    assert time.monotonic() - started < 60
    assert all(r.returncode != 0 for r in results), [r.returncode for r in results]
    assert any("injected fault" in r.stderr for r in results)
    if nodes == 2:  # the other node was not killed by its launcher: it stopped on the posted error
        other = results[1 - int(failing_rank)]
        assert f"rank {failing_rank}: InjectedFault" in other.stderr, other.stderr[-2000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_nccl_two_ranks_match_one_cuda_process(world, out, tmp_path):
    """One rank per GPU (LOCAL_RANK picks it), NCCL: the weights of a single-process CUDA run."""
    args = [a if a != "cpu" else "cuda" for a in _args(_recipe(world, "task_arithmetic", out))]
    assert cli.main(args) == 0
    single = out.rename(tmp_path / "single")
    _ok(torchrun(args))
    for shard in sorted(single.glob("*.safetensors")):
        assert (out / shard.name).read_bytes() == shard.read_bytes(), shard.name
