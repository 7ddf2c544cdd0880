"""``streammerge verify OUT``: check a merged model or adapter directory against its journal.

With a journal (every directory streammerge writes has one), each kept output unit (shard) and
each other output file must be present with its recorded size and SHA-256, each unit's header
must be valid, the job must be complete, and the output format's own checks must pass (the
index places every tensor in a journaled shard; the adapter's header and config are valid).  Without one (a model from elsewhere), the index and headers are checked, not checksums.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError, StreamMergeError
from ..io.header import read_header
from ..io.atomic import file_sha256
from ..names import (JOURNAL_FILE_KEY, JOURNAL_NAME, JOURNAL_OUTPUT_FORMAT_KEY, JOURNAL_SIZE_KEY, JOURNAL_UNITS_KEY,
                     PARTIAL_SUFFIX, SAFETENSORS_SUFFIX)
from ..sinks import SINKS
from ..sinks.hf_model import HfModelSink
from .journal import read_journal

__all__ = ["Verification", "verify_output"]


@dataclass
class Verification:
    """What ``verify_output`` found; ``ok`` when nothing is wrong."""

    out_dir: Path
    checked: list[str] = field(default_factory=list)
    """One line per file found as recorded."""
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _check_file(path: Path, size: int, sha256: str) -> str | None:
    if not path.is_file():
        return f"{path.name}: missing"
    actual = path.stat().st_size
    if actual != size:
        return f"{path.name}: {actual:,} bytes, the journal recorded {size:,} (truncated or overwritten)"
    if file_sha256(path) != sha256:
        return f"{path.name}: its SHA-256 differs from the journal's (the file was modified or damaged)"
    return None


def _check_shard(path: Path) -> str | None:
    try:
        read_header(path)
    except StreamMergeError as e:
        return f"{path.name}: {e}"
    return None


def verify_output(out_dir: str | Path) -> Verification:
    """Check every output file of a merged model or adapter directory.

    Raises:
        InputError: ``out_dir`` is not a directory.
    """
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise InputError(f"{str(out_dir)!r} is not a directory")
    result = Verification(out_dir)
    try:
        state = read_journal(out_dir)
    except StreamMergeError as e:
        result.problems.append(str(e))
        return result
    if state is None:
        result.notes.append(f"no {JOURNAL_NAME}: not written by streammerge, so only the index and headers are "
                            "checked, not checksums")
        _add(result, HfModelSink.check_output(out_dir, None))
        return _leftovers(result)
    output_format = state.job.get(JOURNAL_OUTPUT_FORMAT_KEY, "model")
    sink = SINKS.get(output_format)
    if sink is None:
        result.problems.append(f"the journal names an unknown output format {output_format!r}")
        return result
    planned = [(s[JOURNAL_FILE_KEY], s[JOURNAL_SIZE_KEY]) for s in state.job.get(JOURNAL_UNITS_KEY) or []]
    unit_names = [name for name, _ in planned]
    for name, size in planned:
        entry = state.units.get(name)
        if entry is None:
            where = "is present but" if (out_dir / name).exists() else "is"
            result.problems.append(f"{name}: {where} not recorded as finished")
            continue
        if not sink.keeps_units and state.complete is not None:
            continue  # a scratch unit, consumed by the finished output
        problem = _check_file(out_dir / name, entry.size, entry.sha256)
        if problem is None and name.endswith(SAFETENSORS_SUFFIX):
            problem = _check_shard(out_dir / name)
        if problem is None and size is not None and entry.size != size:
            problem = f"{name}: {entry.size:,} bytes recorded, the job planned {size:,}"
        if problem:
            result.problems.append(problem)
        else:
            result.checked.append(f"{name}: {entry.size:,} bytes, header valid, sha256 {entry.sha256[:16]}… ok")
    if state.complete is None:
        finished = sum(1 for name in unit_names if name in state.units)
        result.problems.append(f"the job is not complete ({finished} of {len(unit_names)} output units finished); "
                               "re-run the same merge command to resume it")
        return _leftovers(result)
    for name, file_entry in sorted(state.complete.items()):
        problem = _check_file(out_dir / name, file_entry.size, file_entry.sha256)
        if problem:
            result.problems.append(problem)
        else:
            result.checked.append(f"{name}: {file_entry.size:,} bytes, sha256 {file_entry.sha256[:16]}… ok")
    _add(result, sink.check_output(out_dir, unit_names))
    return _leftovers(result)


def _add(result: Verification, found: tuple[list[str], list[str], list[str]]) -> None:
    checked, problems, notes = found
    result.checked += checked
    result.problems += problems
    result.notes += notes


def _leftovers(result: Verification) -> Verification:
    partial = sorted(p.name for p in result.out_dir.iterdir() if p.name.endswith(PARTIAL_SUFFIX))
    if partial:
        result.problems.append(f"partial files left by an interrupted write: {partial[:5]}; re-run the merge "
                               "command to finish the job")
    return result
