"""How a job starts in its output directory: new, resumed, already finished, or refused.

``open_job`` reads the directory and its journal and decides, changing nothing; the engine
then runs its pre-flight checks, and ``JobStart.begin`` deletes our own stale files (partial
writes, units that fail verification, a job discarded by ``--restart``) and opens the journal.
Files streammerge did not write are never deleted: a directory holding any is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import OutputError, ResumeError
from ..io.atomic import fsync_dir
from .journal import (Journal, JournalState, UnitEntry, is_rank_journal, job_differences, job_record,
                      read_journal)
from ..names import JOURNAL_NAME, PARTIAL_SUFFIX, SPOOL_SUFFIX
from ..planning.plan import MergePlan

__all__ = ["JobStart", "OutputLayout", "open_job"]


@dataclass(frozen=True)
class OutputLayout:
    """What a sink will write: its units (name, planned size or None, tensor names) and its other files."""

    units: list[tuple[str, int | None, list[str]]]
    files: list[str]
    """Files written once every unit is (the recipe and model card included)."""
    keeps_units: bool = True
    """Units stay in the finished output (False: scratch files, deleted once the job is complete)."""

    @property
    def unit_names(self) -> list[str]:
        return [name for name, _, _ in self.units]


@dataclass
class JobStart:
    """What ``open_job`` found in the output directory; ``begin`` acts on it."""

    out_dir: Path
    job: dict[str, Any]
    state: JournalState | None
    """The existing journal to continue, or None to start a new one."""
    done: dict[str, UnitEntry]
    """Finished units of this job, verified by size and checksum."""
    complete: bool = False
    """The directory already holds this job, finished: nothing to do."""
    stale: list[Path] = field(default_factory=list)
    """Our own files to delete first: partial files, units that failed verification, a discarded job."""
    notes: list[str] = field(default_factory=list)

    def begin(self) -> Journal:
        """Delete stale files and create (or reopen) the journal; the job may now write."""
        try:
            for path in self.stale:
                path.unlink(missing_ok=True)
            self.out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(f"cannot prepare output directory {str(self.out_dir)!r}: {e.strerror or e}") from e
        if self.stale:
            fsync_dir(self.out_dir)
        if self.state is None:
            return Journal.create(self.out_dir, self.job)
        return Journal.reopen(self.state)


def _ours(names: set[str]) -> set[str]:
    """Our output names, their partial files, a sink's spool of a unit being written, and the journal."""
    return (names | {n + PARTIAL_SUFFIX for n in names} | {n + SPOOL_SUFFIX + PARTIAL_SUFFIX for n in names}
            | {JOURNAL_NAME, JOURNAL_NAME + PARTIAL_SUFFIX})


def open_job(out_dir: Path, plan: MergePlan, output: OutputLayout, restart: bool = False) -> JobStart:
    """Decide how a job starts in ``out_dir``: new, resumed, already finished, or refused.

    Reads and verifies, but changes nothing on disk (``JobStart.begin`` does).

    Raises:
        OutputError: ``out_dir`` is not a directory, or holds files that are not this job's.
        ResumeError: it holds a job with another recipe or other inputs (and not ``restart``),
            or its journal is damaged.
    """
    files = output.files
    job = job_record(plan, output.units, files)
    unit_names = set(output.unit_names)
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"output path {str(out_dir)!r} exists and is not a directory")
    try:
        present = sorted(p.name for p in out_dir.iterdir()) if out_dir.is_dir() else []
    except OSError as e:
        raise OutputError(f"cannot list output directory {str(out_dir)!r}: {e.strerror or e}") from e
    try:
        state = read_journal(out_dir)
    except ResumeError:
        if not restart:
            raise
        state = None
    if state is not None:
        mine = _ours(unit_names | set(files) | state.names)
    elif JOURNAL_NAME in present:  # damaged, and restart: this plan's names are all we can claim
        mine = _ours(unit_names | set(files))
    else:  # no job here: only leftovers of one that died before its journal existed
        mine = {n for n in present if n.endswith(PARTIAL_SUFFIX)}
    if JOURNAL_NAME in present:  # the ranks' journals of a distributed job
        mine |= {n for n in present if is_rank_journal(n)}
    foreign = [n for n in present if n not in mine]
    if foreign:
        raise OutputError(
            f"output directory {str(out_dir)!r} is not empty and holds files that are not part of this streammerge "
            f"job ({foreign[:5]}{' …' if len(foreign) > 5 else ''}); choose a new directory or empty it "
            "(streammerge never deletes files it did not write)")
    stale = [out_dir / n for n in present if n.endswith(PARTIAL_SUFFIX)]
    if state is None:
        if restart:
            stale = [out_dir / n for n in present]
        return JobStart(out_dir, job, None, {}, stale=stale)

    differences = job_differences(state.job, job)
    if differences:
        if restart:
            return JobStart(out_dir, job, None, {}, stale=[out_dir / n for n in present],
                            notes=["discarded the previous job: " + "; ".join(differences)])
        what = "a finished merge" if state.complete is not None else "an unfinished job"
        lines = "\n".join(f"  - {d}" for d in differences)
        raise ResumeError(
            f"output directory {str(out_dir)!r} holds {what} with a different recipe or inputs:\n{lines}\n"
            + ("Re-run with the original recipe and inputs to resume it, or pass --restart to discard it and start "
               "over." if state.complete is None else
               "Choose another output directory, or pass --restart to replace it."))
    if restart:
        return JobStart(out_dir, job, None, {}, stale=[out_dir / n for n in present],
                        notes=["discarded the previous run of this job (--restart)"])

    planned = {name: size for name, size, _ in output.units}
    if state.complete is not None and _looks_complete(out_dir, state, planned, output.keeps_units):
        leftovers = [] if output.keeps_units else [out_dir / n for n in present if n in planned]
        leftovers += [out_dir / n for n in present if is_rank_journal(n)]  # folded in before ``complete``
        return JobStart(out_dir, job, state, dict(state.units), complete=True, stale=leftovers)
    done: dict[str, UnitEntry] = {}
    notes: list[str] = []
    for name, entry in state.units.items():
        if name not in planned:
            continue
        size = planned[name]
        problem = entry.check(out_dir) if size is None or entry.size == size else f"{name} has an unexpected size"
        if problem is None:
            done[name] = entry
        else:
            notes.append(f"rewriting {name}: {problem}")
            stale.append(out_dir / name)
    # Units renamed into place whose record never made it: written again.
    stale += [out_dir / n for n in present if n in planned and n not in done and out_dir / n not in stale]
    return JobStart(out_dir, job, state, done, stale=stale, notes=notes)


def _looks_complete(out_dir: Path, state: JournalState, planned: dict[str, int | None], keeps_units: bool) -> bool:
    """Every unit and file of a finished job is present with its recorded size (no checksums: a no-op is quick)."""
    expected = {name: e.size for name, e in state.units.items() if name in planned}
    if set(expected) != set(planned):
        return False
    if not keeps_units:
        expected = {}  # scratch units were consumed by the finished output
    expected.update({name: f.size for name, f in (state.complete or {}).items()})
    for name, size in expected.items():
        path = out_dir / name
        if not path.is_file() or path.stat().st_size != size:
            return False
    return True
