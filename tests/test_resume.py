"""Resumable jobs: a job SIGKILLed anywhere and re-run gives the bytes of an uninterrupted run.

The kill happens in a forked child (``faults.arm``), so each kill point costs a fraction of a
second; one end-to-end test does the same through the CLI with ``STREAMMERGE_TEST_KILL_AT``.
Every run uses one torch thread, as a resumed job on the same machine would.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from streammerge import InputSpec, Recipe, build_plan, cli, run_plan
from streammerge.jobs import faults
from streammerge.sinks import sink_for
from streammerge.errors import OutputError, ResumeError
from streammerge.jobs.journal import read_journal
from streammerge.methods import REGISTRY
from streammerge.names import (INDEX_NAME, JOURNAL_NAME, MODEL_CARD_NAME, PARTIAL_SUFFIX,
                               RECIPE_NAME)
from streammerge.jobs.verify import verify_output
from tests.helpers import run_cli
from tools.synthetic import PRESETS, write_adapter, write_model

# DARE draws random masks: resume must reproduce them (per-tensor seeded generators).
RANDOM_METHOD = "dare_linear" if "dare_linear" in REGISTRY else "task_arithmetic"
SHARD_SIZE = 90_000  # the tiny bf16 model (~281 KB) becomes 4 output shards
RUN_LINE = b"- device: "  # the model card's wall time / peak RSS line: the only bytes a run may change


@pytest.fixture(scope="module")
def world(tmp_path_factory, one_torch_thread):
    root = tmp_path_factory.mktemp("resume")
    base = write_model(root / "base", PRESETS["tiny"], "BF16", seed=0, max_shard_size=100_000)
    adapters = [write_adapter(base, root / "a1", rank=4, seed=1, b_std=0.05),
                write_adapter(base, root / "a2", rank=2, seed=2, b_std=0.05, targets=("q_proj", "up_proj"))]
    out = root / "out"  # every run writes here: the recipe and card record the output path
    recipe = _recipe(base, adapters, out)
    plan = build_plan(recipe)
    sink = sink_for(plan)
    assert len(sink.units()) == 4 and sink.write_index
    run_plan(plan, out)
    reference = root / "reference"
    out.rename(reference)
    return {"root": root, "base": base, "adapters": adapters, "out": out, "plan": plan, "recipe": recipe,
            "reference": reference}


def _recipe(base: Path, adapters: list[Path], out: Path, **kw) -> Recipe:
    kw = {"method": RANDOM_METHOD, "seed": 7, **kw}
    return Recipe(base=str(base), inputs=tuple(InputSpec(str(a), weight=w) for a, w in zip(adapters, (1.0, 0.7))),
                  device="cpu", max_shard_size=SHARD_SIZE, out=str(out), **kw)


@pytest.fixture
def out(world):
    path = world["out"]
    shutil.rmtree(path, ignore_errors=True)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def killed_run(plan, out: Path, spec: str) -> None:
    """Run ``plan`` in a forked child that SIGKILLs itself at ``spec`` (see streammerge/jobs/faults.py)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child never returns
        code = 1
        try:
            torch.set_num_threads(1)
            faults.arm(spec)
            run_plan(plan, out)
            code = 0  # the kill point was never reached
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, \
        f"kill point {spec!r} was not reached (exit status {status})"


def _final_state(out: Path) -> tuple:
    """What a journal says in the end: the job, each shard's latest record, the other files but the card."""
    state = read_journal(out)
    assert state is not None and state.complete is not None
    state.complete.pop(MODEL_CARD_NAME)
    return state.job, state.units, state.complete


def assert_same_output(reference: Path, out: Path) -> None:
    """Every file byte-identical, except the card's run line (and the journal's checksum of the card)."""
    names = sorted(p.name for p in reference.iterdir())
    assert sorted(p.name for p in out.iterdir()) == names
    for name in names:
        expected, actual = (reference / name).read_bytes(), (out / name).read_bytes()
        if name == MODEL_CARD_NAME:
            expected, actual = ([line for line in b.splitlines() if not line.startswith(RUN_LINE)]
                                for b in (expected, actual))
        if name == JOURNAL_NAME:  # records come in the order shards finished, a shard may be recorded twice
            expected, actual = _final_state(reference), _final_state(out)
        assert expected == actual, f"{name} differs from the uninterrupted run"


# Points in the life of a job (4 shards of ~70 KB, 5 other files), and how many shards a re-run
# finds finished. "bytes" kills land inside a shard write: a header, a copied or a merged tensor.
KILL_POINTS = [
    ("record:1", 0),  # the job record is on disk, nothing else
    ("bytes:4", 0),  # inside the first shard's header
    ("bytes:50000", 0),  # inside the first shard's data
    ("shard:1", 0),  # first shard renamed into place but not journaled: written again
    ("record:2", 1),  # first shard journaled
    ("bytes:170000", 2),  # inside the third shard (merged, DARE-masked tensors)
    ("shard:4", 3),  # last shard renamed, its record not yet written
    ("file:1", 4),  # all shards done, one config copied
    ("file:5", 4),  # the model card written, the completion record not yet
]


@pytest.mark.parametrize("spec,finished", KILL_POINTS, ids=[p for p, _ in KILL_POINTS])
def test_killed_anywhere_resumes_to_identical_bytes(world, out, spec, finished):
    killed_run(world["plan"], out, spec)
    assert not (out / INDEX_NAME).exists() or spec.startswith("file"), "no index before every shard is done"
    state = read_journal(out)
    assert state is None or state.complete is None, "an interrupted job must not claim completion"
    assert not out.exists() or not verify_output(out).ok
    report = run_plan(world["plan"], out)
    assert report.resumed_units == finished and not report.already_complete
    assert not list(out.glob("*" + PARTIAL_SUFFIX))
    assert_same_output(world["reference"], out)
    assert verify_output(out).ok
    assert run_plan(world["plan"], out).already_complete, "a second run is a no-op"


def test_killed_twice_then_resumed(world, out):
    killed_run(world["plan"], out, "bytes:120000")
    killed_run(world["plan"], out, "file:2")
    assert run_plan(world["plan"], out).resumed_units == 4
    assert_same_output(world["reference"], out)


def test_method_stats_survive_resume(world, out, tmp_path):
    """DO-Merging reports per-tensor stats; a resumed job's card must show all of them, as one run does."""
    plan = build_plan(_recipe(world["base"], world["adapters"], out, method="do_merging", params=(("steps", 5),)))
    run_plan(plan, out)
    reference = tmp_path / "do_reference"
    out.rename(reference)
    killed_run(plan, out, "record:3")
    report = run_plan(plan, out)
    assert report.resumed_units == 2 and len(report.stats) == 14
    assert "## Method statistics" in (out / MODEL_CARD_NAME).read_text()
    assert_same_output(reference, out)


def test_finished_job_is_a_no_op(world, out):
    run_plan(world["plan"], out)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    report = run_plan(world["plan"], out)
    assert report.already_complete and report.tensors_merged == 14 and len(report.files) == 4
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_deleted_or_damaged_shard_is_rewritten(world, out):
    run_plan(world["plan"], out)
    (out / "model-00002-of-00004.safetensors").unlink()
    shard = out / "model-00003-of-00004.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    report = run_plan(world["plan"], out)
    assert report.resumed_units == 2
    assert any("model-00003-of-00004.safetensors" in n and "SHA-256" in n for n in report.notes)
    assert_same_output(world["reference"], out)


def test_torn_journal_line_is_ignored(world, out):
    killed_run(world["plan"], out, "record:3")
    with open(out / JOURNAL_NAME, "ab") as f:
        f.write(b'{"record":"shard","file":"model-00003-of-0')  # died mid-append
    assert run_plan(world["plan"], out).resumed_units == 2
    assert_same_output(world["reference"], out)


def test_damaged_journal_is_refused_and_restart_starts_over(world, out):
    killed_run(world["plan"], out, "record:3")
    lines = (out / JOURNAL_NAME).read_text().splitlines()
    lines[1] = lines[1][:20] + "#" + lines[1][21:]
    (out / JOURNAL_NAME).write_text("\n".join(lines) + "\n")
    with pytest.raises(ResumeError, match="damaged at line 2.*--restart"):
        run_plan(world["plan"], out)
    report = run_plan(world["plan"], out, restart=True)
    assert report.resumed_units == 0
    assert_same_output(world["reference"], out)


def test_changed_recipe_is_refused_naming_the_change(world, out):
    killed_run(world["plan"], out, "record:2")
    changed = build_plan(_recipe(world["base"], world["adapters"], out, seed=8))
    with pytest.raises(ResumeError, match=r"unfinished job with a different recipe(.|\n)*recipe seed: 7 then, 8 now"):
        run_plan(changed, out)
    weights = build_plan(replace(world["recipe"], inputs=tuple(InputSpec(str(a), weight=0.5)
                                                               for a in world["adapters"])))
    with pytest.raises(ResumeError, match=r"recipe inputs\[0\]\.weight: 1\.0 then, 0\.5 now"):
        run_plan(weights, out)
    report = run_plan(changed, out, restart=True)
    assert report.resumed_units == 0 and any("discarded" in n for n in report.notes)
    assert verify_output(out).ok


def test_changed_input_is_refused(world, out, tmp_path):
    killed_run(world["plan"], out, "record:2")
    adapter = world["adapters"][0]
    saved = tmp_path / "saved"
    shutil.copytree(adapter, saved)
    try:
        write_adapter(world["base"], adapter, rank=4, seed=99, b_std=0.05)  # same shapes, other weights
        with pytest.raises(ResumeError, match=r"input 0 \(.*a1'\) changed since the job started "
                                              r"\(its weights differ\)"):
            run_plan(build_plan(world["recipe"]), out)
        write_adapter(world["base"], adapter, rank=8, seed=1, b_std=0.05)  # other shapes
        with pytest.raises(ResumeError, match=r"input 0 .* \(its tensor names, shapes or dtypes differ\)"):
            run_plan(build_plan(world["recipe"]), out)
    finally:
        shutil.rmtree(adapter)
        shutil.copytree(saved, adapter)
    assert run_plan(world["plan"], out).resumed_units == 1


def test_directory_holding_something_else_is_refused(world, out, tmp_path):
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    for restart in (False, True):
        with pytest.raises(OutputError, match=r"not part of this streammerge job \(\['notes.txt'\]\)"):
            run_plan(world["plan"], out, restart=restart)
    assert (out / "notes.txt").read_text() == "keep me"
    # A model from elsewhere (no journal), e.g. the base itself.
    with pytest.raises(OutputError, match="not part of this streammerge job"):
        run_plan(world["plan"], world["base"], restart=True)
    # A different streammerge model: refused; --restart replaces it.
    shutil.rmtree(out)
    other = build_plan(_recipe(world["base"], world["adapters"], out, method="task_arithmetic"))
    run_plan(other, out)
    with pytest.raises(ResumeError, match=r"holds a finished merge with a different recipe(.|\n)*recipe method: "
                                          r"'task_arithmetic' then, '" + RANDOM_METHOD):
        run_plan(world["plan"], out)
    run_plan(world["plan"], out, restart=True)
    assert_same_output(world["reference"], out)
    # Our job plus a stranger's file: refused, nothing deleted.
    (out / "extra.bin").write_bytes(b"x")
    with pytest.raises(OutputError, match="extra.bin"):
        run_plan(world["plan"], out, restart=True)
    assert (out / MODEL_CARD_NAME).exists() and (out / "extra.bin").exists()


def test_verify_reports_every_damage(world, out, capsys):
    run_plan(world["plan"], out)
    assert cli.main(["verify", str(out)]) == 0
    assert "all files check out" in capsys.readouterr().out
    shard1, shard2 = out / "model-00001-of-00004.safetensors", out / "model-00002-of-00004.safetensors"
    data = bytearray(shard1.read_bytes())
    data[len(data) // 2] ^= 1
    shard1.write_bytes(bytes(data))
    shard2.write_bytes(shard2.read_bytes()[:1000])
    (out / "model-00004-of-00004.safetensors").unlink()
    (out / RECIPE_NAME).write_text("{}")
    (out / "model-00001-of-00004.safetensors.partial").write_bytes(b"")
    assert cli.main(["verify", str(out)]) == 1
    printed = capsys.readouterr().out
    for text in ["PROBLEM  model-00001-of-00004.safetensors: its SHA-256 differs",
                 "PROBLEM  model-00002-of-00004.safetensors: 1,000 bytes, the journal recorded",
                 "PROBLEM  model-00004-of-00004.safetensors: missing",
                 "PROBLEM  streammerge_recipe.json: 2 bytes",
                 "partial files left by an interrupted write",
                 "ok       model-00003-of-00004.safetensors"]:
        assert text in printed, printed


def test_verify_an_interrupted_job_and_a_foreign_model(world, out, capsys):
    killed_run(world["plan"], out, "bytes:170000")
    result = verify_output(out)
    assert not result.ok
    assert any("not complete (2 of 4 output units finished)" in p for p in result.problems)
    assert cli.main(["verify", str(world["base"])]) == 0  # no journal: index and headers only
    assert "not written by streammerge" in capsys.readouterr().out


def test_cli_sigkill_resume_and_no_op(world, out, capsys):
    """As a user sees it: a SIGKILLed `streammerge merge`, re-run, resumes; a third run does nothing."""
    args = ["merge", "--base", str(world["base"]), "--adapter", str(world["adapters"][0]), "--adapter",
            str(world["adapters"][1]), "--weight", "1", "--weight", "0.7", "--method", RANDOM_METHOD, "--seed", "7",
            "--max-shard-size", str(SHARD_SIZE), "--device", "cpu", "--out", str(out), "--no-progress"]
    env = {**os.environ, faults.KILL_ENV: "bytes:170000", "OMP_NUM_THREADS": "1"}
    killed = run_cli(*args, check=False, env=env)
    assert killed.returncode == -signal.SIGKILL
    env.pop(faults.KILL_ENV)
    resumed = run_cli(*args, env=env)
    assert "resumed: 2 of 4 output unit(s) were finished by an earlier run" in resumed.stderr
    for name in [p.name for p in world["reference"].glob("*.safetensors")] + [INDEX_NAME, "config.json"]:
        assert (out / name).read_bytes() == (world["reference"] / name).read_bytes(), name
    assert cli.main(args) == 0  # nothing to compute: in-process is as good as a subprocess here
    printed = capsys.readouterr()
    assert "already holds this job, finished; nothing to do" in printed.err
    assert json.loads(printed.out)["already_complete"] is True
