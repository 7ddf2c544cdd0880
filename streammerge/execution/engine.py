"""The engine: plan a job, then execute it unit by unit into the sink of its output format.

The job lifecycle is the same for every output format: lock the output directory, decide how
the job starts there (new, resumed, finished, refused), run the pre-flight checks, then for each
output unit the sink writes it from the worker's merged tensors and the journal records it; at
the end the sink writes what needs every unit, the recipe and model card follow, and the
journal's ``complete`` record closes the job.  The engine never knows which format it writes.

Under ``torchrun`` (``cohort``, see ``distributed.py``) rank 0 runs this lifecycle and writes
its share of the units; the other ranks write and journal theirs (``_follow``).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import DistributedError, PlanError
from ..io.atomic import file_sha256, fsync_dir, write_bytes_atomic
from ..jobs.faults import kill_point
from ..jobs.journal import FileEntry, Journal, UnitEntry
from ..jobs.lock import OutputLock
from ..jobs.modelcard import render_model_card
from ..jobs.preflight import check_finite_inputs, check_free_space
from ..jobs.report import FileRecord, MergeReport
from ..jobs.resume import JobStart, OutputLayout, open_job
from ..names import MODEL_CARD_NAME, RECIPE_NAME
from ..planning.plan import MergePlan, plan_merge
from ..recipe import Recipe
from ..sinks import Sink, UnitTally, sink_for
from ..sinks.base import OutputUnit, ProgressCallback
from .memory import PeakMemoryMonitor
from .model_pass import prepare_model_statistics
from .worker import Readers, TensorMerger, resolve_device

if TYPE_CHECKING:  # torch.distributed is imported only by distributed jobs (cli.cmd_merge under torchrun)
    from .distributed import Cohort

__all__ = ["build_plan", "run_plan", "recipe_record", "output_layout"]


def build_plan(recipe: Recipe, *, allow_pickle: bool = False) -> MergePlan:
    """Validate a recipe against its files and its output format, and produce the plan.

    Args:
        recipe: the job.
        allow_pickle: read pickle-only adapters (``adapter_model.bin``) with
            ``torch.load(weights_only=True)``; refused unread otherwise.

    Raises:
        PlanError: listing every problem found (inputs first, then what the output format cannot hold).
    """
    plan = plan_merge(recipe, allow_pickle=allow_pickle)
    problems = sink_for(plan).problems()
    if problems:
        raise PlanError(problems)
    return plan


def recipe_record(plan: MergePlan) -> bytes:
    """``streammerge_recipe.json``: the resolved recipe (loadable by ``streammerge merge FILE``) and its sources."""
    doc = {"recipe": plan.resolved_recipe().to_dict(), "plan_fingerprint": plan.fingerprint(),
           "sources": [asdict(s) for s in plan.sources]}
    return (json.dumps(doc, indent=2) + "\n").encode()


def output_layout(sink: Sink) -> OutputLayout:
    """What the journal and the resume decision need to know about a sink's output."""
    units = [(u.file_name, u.size, [t.name for t in u.tensors]) for u in sink.units()]
    return OutputLayout(units, [*sink.final_names(), RECIPE_NAME, MODEL_CARD_NAME], sink.keeps_units)


def _write_and_record(unit: OutputUnit, out_dir: Path, sink: Sink, merger: TensorMerger, journal: Journal,
                      progress: ProgressCallback | None) -> UnitEntry:
    """Write one unit, then journal it (with its counts, stats and the sink's notes, which a resumed run reuses)."""
    tally = UnitTally()
    merger.expect(unit.tensors)
    written = sink.write_unit(unit, out_dir, merger, tally, progress)
    kill_point("shard")
    entry = UnitEntry(unit.file_name, written.size, written.sha256, tally.tensors_merged, tally.tensors_copied,
                      tally.stats, tally.extra)
    journal.add_unit(entry)
    return entry


def _remove_scratch_units(job: JobStart, sink: Sink) -> None:
    """Delete the scratch units a finished job consumed (a sink that does not keep them)."""
    if sink.keeps_units:
        return
    for unit in sink.units():
        (job.out_dir / unit.file_name).unlink(missing_ok=True)
    fsync_dir(job.out_dir)


def run_plan(plan: MergePlan, out_dir: str | Path, progress: ProgressCallback | None = None, *,
             restart: bool = False, check_finite: bool = True, cohort: Cohort | None = None) -> MergeReport:
    """Execute ``plan`` into ``out_dir``; resume there if it holds an interrupted run of the same job.

    Args:
        plan: the plan to execute.
        out_dir: a new or empty directory, or one holding this job (finished units are
            verified and kept; a finished job is left as it is, ``already_complete``).
        progress: called with each tensor's name and output bytes.
        restart: discard a job of ours found in ``out_dir`` (never files we did not write).
        check_finite: refuse adapters holding NaN / Inf before writing (and any input tensor
            the worker reads).
        cohort: the ranks of a distributed job (None: this process does the whole job).

    Raises:
        PlanError: the output format cannot hold this plan.
        OutputError: ``out_dir`` holds files that are not this job's, is in use by another process
            (``OutputLockedError``), or cannot be written (``DiskSpaceError`` when the disk is too small or full).
        ResumeError: ``out_dir`` holds a job with another recipe or other inputs.
        AdapterError: an input holds NaN or Inf values.
    """
    out_dir = Path(out_dir)
    sink = sink_for(plan)
    problems = sink.problems()
    if problems:
        raise PlanError(problems)
    device = resolve_device(plan.recipe.device)
    if cohort is not None and cohort.rank > 0:
        return _follow(plan, sink, out_dir, device, cohort, progress, check_finite)
    layout = output_layout(sink)
    with OutputLock(out_dir):
        job = open_job(out_dir, plan, layout, restart)
        report = MergeReport(output_dir=out_dir, device=str(device), output_format=plan.recipe.output_format,
                             notes=list(job.notes))
        if job.complete:
            if cohort is not None:
                cohort.announce({"complete": True, "plan": plan.fingerprint()})
                cohort.finished()
            report.already_complete = True
            for unit in sink.units():
                report.add_unit(job.done[unit.file_name], sink.keeps_units)
            _add_final_files(report, job, sink)
            for path in job.stale:  # scratch units left by a job killed after its complete record
                path.unlink(missing_ok=True)
            return report
        if check_finite:
            check_finite_inputs(plan)
        check_free_space(out_dir, _bytes_to_write(sink, job))
        journal = job.begin()
        if cohort is not None:
            cohort.announce({"complete": False, "plan": plan.fingerprint(), "done": sorted(job.done),
                             "journal_inode": journal.path.stat().st_ino})
        _execute(plan, sink, job, journal, device, report, progress, check_finite, cohort)
        _remove_scratch_units(job, sink)
        if cohort is not None:
            cohort.finished()
    return report


def _follow(plan: MergePlan, sink: Sink, out_dir: Path, device: torch.device, cohort: Cohort,
            progress: ProgressCallback | None, check_finite: bool) -> MergeReport:
    """Rank r > 0: once rank 0 has opened the job, write and journal this rank's units that are not done."""
    start = cohort.receive()
    if start["plan"] != plan.fingerprint():
        raise PlanError([f"rank {cohort.rank} planned a different job than rank 0 (plan fingerprint "
                         f"{plan.fingerprint()!r}, rank 0: {start['plan']!r}); give every rank the same recipe and "
                         "the same input files"])
    report = MergeReport(output_dir=out_dir, device=str(device), output_format=plan.recipe.output_format,
                         already_complete=start["complete"])
    if start["complete"]:
        return report
    journal = Journal.for_rank(out_dir, cohort.rank)
    mine, done = cohort.mine(sink.units()), set(start["done"])
    readers = Readers()
    merger: TensorMerger | None = None
    started = time.perf_counter()
    try:
        with PeakMemoryMonitor() as monitor, torch.inference_mode():
            merger = TensorMerger(plan, device, readers, check_finite=check_finite)
            prepare_model_statistics(plan, merger, None, None)  # the same pass as rank 0's, not journaled here
            for unit in sink.units():
                if unit.file_name in mine and unit.file_name not in done:
                    cohort.check_job(out_dir, start["journal_inode"])
                    report.add_unit(_write_and_record(unit, out_dir, sink, merger, journal, progress),
                                    sink.keeps_units)
        report.seconds = time.perf_counter() - started
        report.peak_rss, report.peak_anon_rss = monitor.peak_rss, monitor.peak_anon_rss
        if device.type == "cuda":
            report.peak_gpu_bytes = torch.cuda.max_memory_allocated(device)
    finally:
        if merger is not None:
            merger.close()
        readers.close()
    cohort.done_then_wait()
    return report


def _bytes_to_write(sink: Sink, job: JobStart) -> int:
    """What is left to write: units not done yet, the sink's other files, and room for the card and journal."""
    units = sink.units()
    planned = sum(u.size or 0 for u in units)
    left = sum(u.size or 0 for u in units if u.file_name not in job.done)
    return sink.output_bytes() - planned + left + (1 << 20)


def _add_final_files(report: MergeReport, job: JobStart, sink: Sink) -> None:
    """Weight files a sink assembles at the end (not units) join the report's file list."""
    if sink.keeps_units or job.state is None or job.state.complete is None:
        return
    for name in sink.final_names():
        entry = job.state.complete.get(name)
        if entry is not None and name.endswith(".safetensors"):
            report.files.append(FileRecord(name, entry.size, entry.sha256))
            report.bytes_written += entry.size


def _execute(plan: MergePlan, sink: Sink, job: JobStart, journal: Journal, device: torch.device,
             report: MergeReport, progress: ProgressCallback | None, check_finite: bool,
             cohort: Cohort | None = None) -> None:
    out_dir = job.out_dir
    readers = Readers()
    merger: TensorMerger | None = None
    start = time.perf_counter()
    try:
        with PeakMemoryMonitor() as monitor, torch.inference_mode():
            merger = TensorMerger(plan, device, readers, check_finite=check_finite)
            prepare_model_statistics(plan, merger, job.state, journal)
            mine = cohort.mine(sink.units()) if cohort is not None else None
            done: dict[str, UnitEntry] = {}
            for unit in sink.units():
                entry = job.done.get(unit.file_name)
                if entry is None and (mine is None or unit.file_name in mine):
                    if cohort is not None:
                        cohort.check()
                    done[unit.file_name] = _write_and_record(unit, out_dir, sink, merger, journal, progress)
                elif entry is not None:
                    done[unit.file_name] = entry
                    report.resumed_units += 1
                    for t in unit.tensors if progress is not None else ():
                        progress(t.name, t.out_bytes)
            if cohort is not None:  # the other ranks' units, from their journals
                cohort.wait_for_ranks()
                by_name = {u.file_name: u for u in sink.units()}
                for entry in journal.absorb_rank_journals():
                    if entry.file in by_name:
                        done[entry.file] = entry
                        for t in by_name[entry.file].tensors if progress is not None else ():
                            progress(t.name, t.out_bytes)
                missing = [u.file_name for u in sink.units() if u.file_name not in done]
                if missing:
                    raise DistributedError(f"every rank reported its units done, but the journals in {str(out_dir)!r} "
                                           f"lack {missing[:3]}; re-run the same command to write them")
            entries = [done[unit.file_name] for unit in sink.units()]
            for entry in entries:
                report.add_unit(entry, sink.keeps_units)
            written = sink.finish(out_dir, [e.extra for e in entries])
            if not sink.keeps_units:
                for name in written:
                    if name.endswith(".safetensors"):
                        size = (out_dir / name).stat().st_size
                        report.files.append(FileRecord(name, size, file_sha256(out_dir / name)))
                        report.bytes_written += size
            report.seconds = time.perf_counter() - start
            report.peak_rss, report.peak_anon_rss = monitor.peak_rss, monitor.peak_anon_rss
            if device.type == "cuda":
                report.peak_gpu_bytes = torch.cuda.max_memory_allocated(device)
            write_bytes_atomic(out_dir / RECIPE_NAME, recipe_record(plan))
            kill_point("file")
            write_bytes_atomic(out_dir / MODEL_CARD_NAME, render_model_card(plan, report, sink.card_facts()).encode())
            kill_point("file")
            written += [RECIPE_NAME, MODEL_CARD_NAME]
            journal.add_complete({n: FileEntry((out_dir / n).stat().st_size, file_sha256(out_dir / n))
                                  for n in written})
        report.peak_rss, report.peak_anon_rss = monitor.peak_rss, monitor.peak_anon_rss
    finally:
        if merger is not None:
            merger.close()
        readers.close()
