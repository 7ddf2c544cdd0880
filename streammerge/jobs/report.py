"""What a finished (or already finished) job did and measured."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .journal import UnitEntry

__all__ = ["FileRecord", "MergeReport"]


@dataclass
class FileRecord:
    """A finished output file: a unit kept in the output, or a weight file the sink assembled."""

    file_name: str
    size: int
    sha256: str


@dataclass
class MergeReport:
    """What a finished job did and measured."""

    output_dir: Path
    device: str
    output_format: str = "model"
    files: list[FileRecord] = field(default_factory=list)
    """The output's weight files (shards, or the assembled adapter file), with sizes and checksums."""
    units: int = 0
    """Output units of the job (shards, adapter parts)."""
    tensors_merged: int = 0
    tensors_copied: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    peak_rss: int = 0
    peak_anon_rss: int = 0
    peak_gpu_bytes: int = 0
    stats: dict[str, dict[str, float]] = field(default_factory=dict)
    resumed_units: int = 0
    """Units an earlier, interrupted run had finished (verified and kept)."""
    already_complete: bool = False
    """The output directory already held this job, finished: nothing was done."""
    notes: list[str] = field(default_factory=list)
    """What resuming found (units rewritten, a discarded job)."""

    def add_unit(self, entry: UnitEntry, kept: bool) -> None:
        """Count a finished unit (written now, or by an interrupted run) toward the job's totals."""
        self.units += 1
        if kept:
            self.files.append(FileRecord(entry.file, entry.size, entry.sha256))
            self.bytes_written += entry.size
        self.tensors_merged += entry.tensors_merged
        self.tensors_copied += entry.tensors_copied
        self.stats.update(entry.stats)
