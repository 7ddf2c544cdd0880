"""The job journal: an append-only record, in the output directory, of what a job is and
which of its output units (shards, adapter parts) are finished, so that an interrupted job resumes where it stopped.

``streammerge_journal.jsonl`` holds one JSON object per line, each fsynced before the job
goes on:

1. ``job``: what determines the output bytes — the recipe (hashed fields) and its
   fingerprint, a path-free digest of the plan, the streammerge version, the base and input
   fingerprints (shard sizes + header hashes; adapters also by content hash), the output format
   and its units;
2. ``unit``: one per finished unit — name, size, SHA-256, tensor counts, method stats (so a
   resumed job's model card says what an uninterrupted one says) and what the sink must remember;
3. ``complete``: the index, configs, recipe and model card are written too (name, size,
   SHA-256 of each); the job is done.

A process killed while appending leaves a torn last line; it is ignored, and cut off before
the next append.  Anything else unreadable means the directory was tampered with.

A distributed job (``execution.distributed``) has one writer per file: rank 0 appends to the
journal, rank r > 0 appends ``unit`` records to its own ``streammerge_journal.rank-<r>.jsonl``
(no two processes ever append to one file, so no record can tear another, on NFS too).
``read_journal`` merges them (a rank file's records are newer than the journal's: rank 0 folds
every rank file into the journal and deletes it when a job (re)opens and before ``complete``),
so a finished job's directory holds the one journal a single-process run leaves.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError, OutputError, ResumeError
from .faults import kill_point
from ..io.atomic import file_sha256, fsync_dir, write_bytes_atomic
from ..version import __version__
from ..names import (JOURNAL_BASE_KEY, JOURNAL_COMPLETE, JOURNAL_CONTENT_KEY, JOURNAL_COPIED_KEY, JOURNAL_FILE_KEY,
                    JOURNAL_FILES_KEY, JOURNAL_FINGERPRINT_KEY, JOURNAL_FORMAT, JOURNAL_FORMAT_KEY, JOURNAL_INPUTS_KEY,
                    JOURNAL_JOB, JOURNAL_JOB_DIGEST_KEY, JOURNAL_MERGED_KEY, JOURNAL_NAME, JOURNAL_PATH_KEY,
                    JOURNAL_PLAN_FINGERPRINT_KEY, JOURNAL_RECIPE_FINGERPRINT_KEY, JOURNAL_RECIPE_KEY,
                    JOURNAL_RECORD_KEY, JOURNAL_SHA256_KEY, JOURNAL_UNIT, JOURNAL_UNITS_KEY, JOURNAL_SIZE_KEY, JOURNAL_STATS_KEY,
                    JOURNAL_STATISTICS, JOURNAL_THRESHOLDS_KEY,
                    JOURNAL_VERSION_KEY, JOURNAL_EXTRA_KEY, JOURNAL_OUTPUT_FORMAT_KEY, RANK_JOURNAL_PATTERN,
                    RANK_JOURNAL_TEMPLATE)
from ..planning.plan import MergePlan

__all__ = ["UnitEntry", "FileEntry", "JournalState", "Journal", "job_record", "job_differences", "read_journal",
           "rank_journals", "is_rank_journal"]

@dataclass(frozen=True)
class UnitEntry:
    """A finished output unit, as its journal record says."""

    file: str
    size: int
    sha256: str
    tensors_merged: int = 0
    tensors_copied: int = 0
    stats: dict[str, dict[str, float]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    """What the sink needs again to finish the job (e.g. adapter ranks)."""

    def record(self) -> dict[str, Any]:
        return {JOURNAL_RECORD_KEY: JOURNAL_UNIT, JOURNAL_FILE_KEY: self.file, JOURNAL_SIZE_KEY: self.size,
                JOURNAL_SHA256_KEY: self.sha256, JOURNAL_MERGED_KEY: self.tensors_merged,
                JOURNAL_COPIED_KEY: self.tensors_copied,
                JOURNAL_STATS_KEY: {k: {s: float(v) for s, v in d.items()} for k, d in self.stats.items()},
                JOURNAL_EXTRA_KEY: self.extra}

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> UnitEntry:
        stats = rec.get(JOURNAL_STATS_KEY, {})
        entry = cls(rec[JOURNAL_FILE_KEY], rec[JOURNAL_SIZE_KEY], rec[JOURNAL_SHA256_KEY],
                    rec.get(JOURNAL_MERGED_KEY, 0), rec.get(JOURNAL_COPIED_KEY, 0), stats, rec.get(JOURNAL_EXTRA_KEY, {}))
        if not (isinstance(entry.file, str) and _is_size(entry.size) and _is_sha(entry.sha256)
                and _is_size(entry.tensors_merged) and _is_size(entry.tensors_copied) and _is_stats(stats)
                and isinstance(entry.extra, dict)):
            raise ValueError("malformed unit record")
        return entry

    def check(self, directory: Path) -> str | None:
        """None when the file on disk is this unit (size and checksum), else what is wrong."""
        path = directory / self.file
        if not path.is_file():
            return f"{self.file} is missing"
        size = path.stat().st_size
        if size != self.size:
            return f"{self.file} has {size:,} bytes, the journal recorded {self.size:,}"
        if file_sha256(path) != self.sha256:
            return f"{self.file} does not match its recorded SHA-256 (the file was modified or damaged)"
        return None


@dataclass(frozen=True)
class FileEntry:
    """A finished output file other than a unit (config, index, recipe, model card)."""

    size: int
    sha256: str


def _is_size(value: Any) -> bool:
    return type(value) is int and value >= 0


def _is_stats(value: Any) -> bool:
    return isinstance(value, dict) and all(
        isinstance(d, dict) and all(isinstance(v, (int, float)) for v in d.values()) for d in value.values())


def _is_sha(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


# --- what a job is ---------------------------------------------------------------------------

def _plan_digest(plan: MergePlan, units: list[tuple[str, list[str]]]) -> str:
    """SHA-256 of everything the plan and the sink's units say about the output bytes, without file locations."""
    tensors = []
    for job in plan.tensors:
        doc = asdict(job)
        doc.pop("source_file")
        doc.pop("scale_file")
        for c in doc["contributions"]:
            c.pop("file")
        tensors.append(doc)
    doc = {"method_params": plan.method_params, "config_updates": plan.config_updates, "tensors": tensors,
           "units": units}
    if plan.chat_template is not None:
        doc["chat_template"] = plan.chat_template
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def _hashed_recipe(plan: MergePlan) -> dict[str, Any]:
    doc = plan.recipe.to_dict()
    for name in type(plan.recipe)._NOT_HASHED:
        doc.pop(name, None)
    return doc


def _input_records(plan: MergePlan) -> list[dict[str, Any]]:
    """Each input's fingerprint; adapters (small) also by the SHA-256 of the weights they give."""
    records = []
    for summary in plan.inputs:
        content = None
        if summary.kind == "adapter":
            files = sorted({c.file for t in plan.tensors for c in t.contributions
                            if c.input_index == summary.index})
            h = hashlib.sha256()
            for file in files:
                try:
                    h.update(file_sha256(Path(file)).encode())
                except OSError as e:
                    raise InputError(f"cannot read adapter weights {file!r}: {e.strerror or e}") from e
            content = h.hexdigest()
        records.append({JOURNAL_PATH_KEY: summary.path, JOURNAL_FINGERPRINT_KEY: summary.fingerprint,
                        JOURNAL_CONTENT_KEY: content})
    return records


def job_record(plan: MergePlan, units: list[tuple[str, int | None, list[str]]], files: list[str]) -> dict[str, Any]:
    """The journal's first line for ``plan``.

    Args:
        plan: the plan.
        units: the sink's output units: (file name, planned size or None, tensor names).
        files: the other files the job writes.
    """
    return {
        JOURNAL_RECORD_KEY: JOURNAL_JOB, JOURNAL_FORMAT_KEY: JOURNAL_FORMAT, JOURNAL_VERSION_KEY: __version__,
        JOURNAL_RECIPE_KEY: _hashed_recipe(plan), JOURNAL_RECIPE_FINGERPRINT_KEY: plan.recipe.fingerprint(),
        JOURNAL_OUTPUT_FORMAT_KEY: plan.recipe.output_format, JOURNAL_PLAN_FINGERPRINT_KEY: plan.fingerprint(),
        JOURNAL_JOB_DIGEST_KEY: _plan_digest(plan, [(name, names) for name, _, names in units]),
        JOURNAL_BASE_KEY: {JOURNAL_PATH_KEY: plan.recipe.base, JOURNAL_FINGERPRINT_KEY: plan.base_fingerprint},
        JOURNAL_INPUTS_KEY: _input_records(plan),
        JOURNAL_UNITS_KEY: [{JOURNAL_FILE_KEY: name, JOURNAL_SIZE_KEY: size} for name, size, _ in units],
        JOURNAL_FILES_KEY: sorted(files),
    }


def _flatten(value: Any, path: str, out: dict[str, Any]) -> dict[str, Any]:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(v, f"{path}.{k}" if path else str(k), out)
    elif isinstance(value, list) and value and any(isinstance(v, (dict, list)) for v in value):
        for i, v in enumerate(value):
            _flatten(v, f"{path}[{i}]", out)
    else:
        out[path] = value
    return out


def job_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What differs between two job records, in words (empty: the same job)."""
    if old.get(JOURNAL_FORMAT_KEY) != new[JOURNAL_FORMAT_KEY]:
        return [f"journal format {old.get(JOURNAL_FORMAT_KEY)!r} then, {new[JOURNAL_FORMAT_KEY]!r} now"]
    found = []
    if old.get(JOURNAL_VERSION_KEY) != new[JOURNAL_VERSION_KEY]:
        found.append(f"streammerge version {old.get(JOURNAL_VERSION_KEY)} then, {new[JOURNAL_VERSION_KEY]} now")
    if old.get(JOURNAL_RECIPE_FINGERPRINT_KEY) != new[JOURNAL_RECIPE_FINGERPRINT_KEY]:
        then = _flatten(old.get(JOURNAL_RECIPE_KEY) or {}, "", {})
        now = _flatten(new[JOURNAL_RECIPE_KEY], "", {})
        changed = [k for k in sorted(set(then) | set(now)) if then.get(k) != now.get(k)]
        found += [f"recipe {k}: {then.get(k)!r} then, {now.get(k)!r} now" for k in changed[:8]]
        if not changed:
            found.append("the recipe fingerprint differs")
    old_base, new_base = old.get(JOURNAL_BASE_KEY) or {}, new[JOURNAL_BASE_KEY]
    if old_base.get(JOURNAL_FINGERPRINT_KEY) != new_base[JOURNAL_FINGERPRINT_KEY]:
        found.append(f"the base model {new_base[JOURNAL_PATH_KEY]!r} changed since the job started "
                     "(its shard sizes or headers differ)")
    old_inputs, new_inputs = old.get(JOURNAL_INPUTS_KEY) or [], new[JOURNAL_INPUTS_KEY]
    if len(old_inputs) == len(new_inputs):
        for i, (a, b) in enumerate(zip(old_inputs, new_inputs)):
            if a.get(JOURNAL_FINGERPRINT_KEY) != b[JOURNAL_FINGERPRINT_KEY]:
                found.append(f"input {i} ({b[JOURNAL_PATH_KEY]!r}) changed since the job started "
                             "(its tensor names, shapes or dtypes differ)")
            elif a.get(JOURNAL_CONTENT_KEY) != b[JOURNAL_CONTENT_KEY]:
                found.append(f"input {i} ({b[JOURNAL_PATH_KEY]!r}) changed since the job started "
                             "(its weights differ)")
    if not found and old.get(JOURNAL_JOB_DIGEST_KEY) != new[JOURNAL_JOB_DIGEST_KEY]:
        found.append("the merge plan (tensor map, output units or method parameters) differs "
                     "although the recipe and inputs look the same")
    return found


# --- reading and appending -------------------------------------------------------------------

@dataclass
class JournalState:
    """A journal as found on disk."""

    path: Path
    job: dict[str, Any]
    units: dict[str, UnitEntry]
    """The latest record of each finished unit."""
    complete: dict[str, FileEntry] | None
    """The other output files, when the last record says the job is complete."""
    intact_bytes: int
    """Length of the journal without a torn last line."""
    statistics: Any = None
    """The whole-model first pass's result (``methods.rows.ModelThresholds.record()``), when journaled."""

    @property
    def names(self) -> set[str]:
        """Every output file name this job writes."""
        units = {s.get(JOURNAL_FILE_KEY) for s in self.job.get(JOURNAL_UNITS_KEY) or []}
        return {n for n in units | set(self.job.get(JOURNAL_FILES_KEY) or []) if isinstance(n, str)}

    @property
    def unit_names(self) -> list[str]:
        """The job's planned units, in order."""
        return [s[JOURNAL_FILE_KEY] for s in self.job.get(JOURNAL_UNITS_KEY) or []]


def _is_job(rec: dict[str, Any]) -> bool:
    units = rec.get(JOURNAL_UNITS_KEY)
    files = rec.get(JOURNAL_FILES_KEY)
    return (rec.get(JOURNAL_RECORD_KEY) == JOURNAL_JOB and isinstance(units, list) and isinstance(files, list)
            and all(isinstance(s, dict) and isinstance(s.get(JOURNAL_FILE_KEY), str)
                    and (s.get(JOURNAL_SIZE_KEY) is None or _is_size(s.get(JOURNAL_SIZE_KEY))) for s in units)
            and all(isinstance(f, str) for f in files))


def _corrupt(path: Path, line: int, why: str) -> ResumeError:
    return ResumeError(f"the job journal {str(path)!r} is damaged at line {line} ({why}); it was not written by an "
                       "interrupted streammerge job as it is. Pass --restart to discard the job and start over.")


def is_rank_journal(name: str) -> bool:
    """``name`` is a rank's journal file (``streammerge_journal.rank-<r>.jsonl``)."""
    return re.fullmatch(RANK_JOURNAL_PATTERN, name) is not None


def rank_journals(out_dir: Path) -> list[Path]:
    """The rank journal files in ``out_dir``, by rank."""
    try:
        names = [p.name for p in out_dir.iterdir() if is_rank_journal(p.name)]
    except OSError:
        return []
    return [out_dir / n for n in sorted(names, key=lambda n: int(re.fullmatch(RANK_JOURNAL_PATTERN, n)[1]))]


def _read_lines(path: Path) -> tuple[list[dict[str, Any]], int]:
    """A journal file's records and the length without a torn last line.

    Raises:
        ResumeError: a line other than the last is not a JSON object.
    """
    try:
        data = path.read_bytes()
    except OSError as e:
        raise OutputError(f"cannot read the job journal {str(path)!r}: {e.strerror or e}") from e
    complete_lines = data.split(b"\n")[:-1]  # the part after the last newline is torn (or empty)
    records: list[dict[str, Any]] = []
    intact = 0
    for number, raw in enumerate(complete_lines, start=1):
        try:
            rec = json.loads(raw.decode("utf-8"))
            if not isinstance(rec, dict):
                raise ValueError("not an object")
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            if number == len(complete_lines):
                break  # the last line may be torn by a crash between write and fsync
            raise _corrupt(path, number, str(e)) from e
        records.append(rec)
        intact += len(raw) + 1
    return records, intact


def _rank_units(path: Path) -> list[UnitEntry]:
    records, _ = _read_lines(path)
    entries = []
    for number, rec in enumerate(records, start=1):
        try:
            if rec.get(JOURNAL_RECORD_KEY) != JOURNAL_UNIT:
                raise ValueError(f"a rank journal holds only unit records, not {rec.get(JOURNAL_RECORD_KEY)!r}")
            entries.append(UnitEntry.from_record(rec))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise _corrupt(path, number, str(e)) from e
    return entries


def read_journal(out_dir: Path) -> JournalState | None:
    """The journal in ``out_dir``, or None when there is none.

    Raises:
        ResumeError: the journal is damaged (not just a torn last line).
    """
    path = out_dir / JOURNAL_NAME
    if not path.exists():
        return None
    records, intact = _read_lines(path)
    if not records or not _is_job(records[0]):
        raise _corrupt(path, 1, "the first record is not a job record")
    units: dict[str, UnitEntry] = {}
    complete: dict[str, FileEntry] | None = None
    statistics: Any = None
    for number, rec in enumerate(records[1:], start=2):
        kind = rec.get(JOURNAL_RECORD_KEY)
        try:
            if kind == JOURNAL_UNIT:
                entry = UnitEntry.from_record(rec)
                units[entry.file] = entry
                complete = None
            elif kind == JOURNAL_STATISTICS:
                statistics = rec[JOURNAL_THRESHOLDS_KEY]
            elif kind == JOURNAL_COMPLETE:
                complete = {name: FileEntry(v[JOURNAL_SIZE_KEY], v[JOURNAL_SHA256_KEY])
                            for name, v in rec[JOURNAL_FILES_KEY].items()}
            else:
                raise ValueError(f"unknown record type {kind!r}")
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise _corrupt(path, number, str(e)) from e
    for side in rank_journals(out_dir):  # newer than the journal's records; never reset ``complete``
        units.update((e.file, e) for e in _rank_units(side))
    return JournalState(path, records[0], units, complete, intact, statistics)


def _line(record: dict[str, Any]) -> bytes:
    # Not sort_keys: stats keep the order tensors were merged in (the model card aggregates in it).
    return (json.dumps(record, separators=(",", ":"), allow_nan=True) + "\n").encode("utf-8")


class Journal:
    """Appends records to a job's journal, each on disk before ``append`` returns."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def create(cls, out_dir: Path, job: dict[str, Any]) -> Journal:
        """A new journal holding ``job`` (written whole or not at all)."""
        path = out_dir / JOURNAL_NAME
        write_bytes_atomic(path, _line(job))
        kill_point("record")
        return cls(path)

    @classmethod
    def reopen(cls, state: JournalState) -> Journal:
        """Continue ``state``'s journal, cutting off a torn last line first."""
        try:
            if state.path.stat().st_size != state.intact_bytes:
                os.truncate(state.path, state.intact_bytes)
        except OSError as e:
            raise OutputError(f"cannot repair the job journal {str(state.path)!r}: {e.strerror or e}") from e
        journal = cls(state.path)
        journal.absorb_rank_journals()
        return journal

    @classmethod
    def for_rank(cls, out_dir: Path, rank: int) -> Journal:
        """Rank ``rank`` (> 0) of a distributed job: its own journal file, created empty if missing."""
        path = out_dir / RANK_JOURNAL_TEMPLATE.format(rank=rank)
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644))
            records, intact = _read_lines(path)
            if path.stat().st_size != intact:
                os.truncate(path, intact)
        except OSError as e:
            raise OutputError(f"cannot create the rank journal {str(path)!r}: {e.strerror or e}") from e
        fsync_dir(out_dir)
        return cls(path)

    def absorb_rank_journals(self) -> list[UnitEntry]:
        """Fold every rank journal into this one (one fsynced append), then delete them; returns their units."""
        sides = rank_journals(self.path.parent)
        entries = [e for side in sides for e in _rank_units(side)]
        if entries:
            self._append_bytes(b"".join(_line(e.record()) for e in entries))
        for side in sides:
            side.unlink(missing_ok=True)
        if sides:
            fsync_dir(self.path.parent)
        return entries

    def append(self, record: dict[str, Any]) -> None:
        self._append_bytes(_line(record))
        kill_point("record")

    def _append_bytes(self, data: bytes) -> None:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
            try:
                if os.write(fd, data) != len(data):
                    raise OSError(f"short write to {str(self.path)!r}")
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            raise OutputError(f"cannot append to the job journal {str(self.path)!r}: {e.strerror or e}; "
                              "re-run the same command to resume once the problem is fixed") from e

    def add_unit(self, entry: UnitEntry) -> None:
        self.append(entry.record())

    def add_statistics(self, thresholds: Any) -> None:
        """Record the whole-model first pass's result, so that a resumed job does not run it again."""
        self.append({JOURNAL_RECORD_KEY: JOURNAL_STATISTICS, JOURNAL_THRESHOLDS_KEY: thresholds})

    def add_complete(self, files: dict[str, FileEntry]) -> None:
        self.append({JOURNAL_RECORD_KEY: JOURNAL_COMPLETE, JOURNAL_FILES_KEY: {
            name: {JOURNAL_SIZE_KEY: f.size, JOURNAL_SHA256_KEY: f.sha256} for name, f in sorted(files.items())}})
