"""Checks that run after planning and before the first byte of output is written.

- Every adapter tensor the plan reads (LoRA factors, LoRA biases, saved modules) is finite.
  Adapters are small next to the base, so reading them once more costs little, and a
  corrupt adapter fails before the output directory is touched rather than mid-job.
  Full fine-tunes are as large as the base: their tensors are checked as the engine reads them.
- The file system holding the output has room for what is left to write.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from ..planning.describe import free_disk_bytes
from ..errors import AdapterError, DiskSpaceError
from ..inputs.kinds import KINDS
from ..io.dtypes import FLOAT_DTYPE_NAMES
from ..io.reader import BLOCK_BYTES, CheckpointReader, open_checkpoint
from ..planning.plan import MergePlan

__all__ = ["check_finite_inputs", "check_free_space", "non_finite_counts"]

MAX_LISTED = 10


def non_finite_counts(reader: CheckpointReader, key: str) -> tuple[int, int]:
    """(NaN count, ±Inf count) of tensor ``key``, read in row blocks in its own dtype."""
    info = reader.layout.info(key)
    if info.dtype not in FLOAT_DTYPE_NAMES or not info.numel:
        return 0, 0
    if not info.shape:
        tensor = reader.read(key)
        return int(torch.isnan(tensor).sum()), int(torch.isinf(tensor).sum())
    row_bytes = max(1, info.nbytes // max(1, info.shape[0]))
    step = max(1, BLOCK_BYTES // row_bytes)  # bounds memory for large saved modules
    nans = infs = 0
    for start in range(0, info.shape[0], step):
        block = reader.read_rows(key, start, min(info.shape[0], start + step))
        nans += int(torch.isnan(block).sum())
        infs += int(torch.isinf(block).sum())
    return nans, infs


def check_finite_inputs(plan: MergePlan) -> None:
    """Refuse adapters holding NaN or Inf values before anything is written.

    Raises:
        AdapterError: naming every bad tensor (up to ``MAX_LISTED``), its file and counts.
    """
    keys: dict[str, set[str]] = {}
    for job in plan.tensors:
        for c in job.contributions:
            if KINDS[c.kind].checked_before_job:
                keys.setdefault(c.file, set()).update(c.keys)
    bad = list(_non_finite(keys.items()))
    if bad:
        listed = "\n".join(f"  - {key!r} in {file!r}: {nans} NaN, {infs} Inf" for file, key, nans, infs in bad)
        raise AdapterError(
            f"{len(bad)} adapter tensor(s) hold NaN or Inf values, so the merged model would too:\n{listed}\n"
            "The adapter is corrupt (e.g. a diverged training run); re-export it, or pass --no-check-finite "
            "to merge anyway.")


def _non_finite(files: Iterable[tuple[str, set[str]]]) -> Iterable[tuple[str, str, int, int]]:
    found = 0
    for file, keys in sorted(files):
        with CheckpointReader(open_checkpoint(file)) as reader:
            for key in sorted(keys):
                nans, infs = non_finite_counts(reader, key)
                if nans or infs:
                    yield file, key, nans, infs
                    found += 1
                    if found == MAX_LISTED:
                        return


def check_free_space(out_dir: Path, needed: int) -> None:
    """Refuse to start when the file system holding ``out_dir`` has less than ``needed`` bytes free.

    Raises:
        DiskSpaceError: with both numbers.
    """
    free = free_disk_bytes(out_dir)
    if free < needed:
        raise DiskSpaceError(
            f"not enough free disk space for the output in {str(out_dir)!r}: the job still needs {needed:,} bytes "
            f"({needed / 2**30:.2f} GiB) but only {free:,} bytes ({free / 2**30:.2f} GiB) are free; free some "
            "space or choose another --out")
