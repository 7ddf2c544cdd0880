"""Which tensors the worker merges together: the current output unit's, in order, a window at a time.

A method with ``merge_many`` (DO-Merging: 200 Adam steps of tiny ops per tensor side) merges a
tensor together with the batchable tensors after it in its unit, up to ``LOOKAHEAD_BYTES`` of
factors, and the results of the others wait here for their turn.  The window depends only on the
unit's tensors (never on memory limits or ranks), and a unit is always written from its start,
so the bytes do not depend on how a job was run or resumed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ..planning.budget import LOOKAHEAD_BYTES, lowrank_factor_bytes
from ..planning.plan import TensorJob

__all__ = ["Lookahead"]


class Lookahead:
    """The expected tensors of the current unit and the results merged ahead for them."""

    def __init__(self) -> None:
        self._jobs: list[TensorJob] = []
        self._position: dict[str, int] = {}
        self._ready: dict[str, Any] = {}

    def expect(self, jobs: Sequence[TensorJob]) -> None:
        """The tensors about to be merged, in order; what was kept for earlier ones is dropped."""
        self._jobs = list(jobs)
        self._position = {job.name: i for i, job in enumerate(self._jobs)}
        self._ready.clear()

    def pop(self, name: str) -> Any:
        """The result kept for tensor ``name`` (None if there is none)."""
        return self._ready.pop(name, None)

    def window(self, job: TensorJob, batchable: Callable[[TensorJob], bool],
               limit: int | None = None) -> list[TensorJob]:
        """``job`` and the batchable tensors after it that have no result yet, up to ``limit`` bytes of factors."""
        limit = LOOKAHEAD_BYTES if limit is None else limit
        window = [job]
        size = lowrank_factor_bytes(job)
        position = self._position.get(job.name)
        for later in self._jobs[position + 1:] if position is not None else ():
            if later.name in self._ready or not batchable(later):
                continue
            size += lowrank_factor_bytes(later)
            if size > limit:
                break
            window.append(later)
        return window

    def keep(self, jobs: Sequence[TensorJob], results: Sequence[Any]) -> None:
        """Results for tensors merged ahead of their turn."""
        for job, result in zip(jobs, results):
            self._ready[job.name] = result
