"""Which tensors the worker merges together, and the next window merged while the current one is written.

A method with ``merge_many`` (DO-Merging: 200 Adam steps of tiny ops per tensor side) merges a
tensor together with the batchable tensors after it in its unit, up to ``LOOKAHEAD_BYTES`` of
factors, and the results of the others wait here for their turn.  The window depends only on the
unit's tensors (never on memory limits or ranks), and a unit is always written from its start,
so the bytes do not depend on how a job was run or resumed.

While the worker writes one window's tensors (reading base rows, adding the update, casting:
mostly memory and disk), the next window's ``merge_many`` runs on one background thread
(``start``): its inputs were loaded by the worker, the thread does tensor math only.  Windows are
the same with or without the thread, and so are the results (the same ops on the same tensors).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from ..planning.budget import LOOKAHEAD_BYTES, lowrank_factor_bytes
from ..planning.plan import TensorJob

__all__ = ["Lookahead"]


class Lookahead:
    """The expected tensors of the current unit, the results merged ahead for them, the window in flight."""

    def __init__(self, background: bool = True) -> None:
        self._jobs: list[TensorJob] = []
        self._position: dict[str, int] = {}
        self._ready: dict[str, Any] = {}
        self._background = background
        self._executor: ThreadPoolExecutor | None = None
        self._in_flight: tuple[list[TensorJob], Future[list[Any]]] | None = None

    def expect(self, jobs: Sequence[TensorJob]) -> None:
        """The tensors about to be merged, in order; what was kept or started for earlier ones is dropped."""
        self._drop_in_flight()
        self._jobs = list(jobs)
        self._position = {job.name: i for i, job in enumerate(self._jobs)}
        self._ready.clear()

    def pop(self, name: str) -> Any:
        """The result kept for tensor ``name`` (None if there is none)."""
        return self._ready.pop(name, None)

    def in_flight(self, name: str) -> bool:
        """Whether ``name`` belongs to the window being merged on the background thread."""
        return self._in_flight is not None and any(job.name == name for job in self._in_flight[0])

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

    def following(self, job: TensorJob, batchable: Callable[[TensorJob], bool]) -> TensorJob | None:
        """The first batchable tensor after ``job`` in the unit with no result yet: where the next window starts."""
        position = self._position.get(job.name)
        for later in self._jobs[position + 1:] if position is not None else ():
            if later.name not in self._ready and batchable(later):
                return later
        return None

    def keep(self, jobs: Sequence[TensorJob], results: Sequence[Any]) -> None:
        """Results for tensors merged ahead of their turn."""
        for job, result in zip(jobs, results):
            self._ready[job.name] = result

    def start(self, jobs: list[TensorJob], compute: Callable[[], list[Any]]) -> None:
        """Results for ``jobs`` from ``compute``, run on the background thread (at once without one)."""
        self.collect()
        if not self._background:
            self.keep(jobs, compute())
            return
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="streammerge-lookahead")
        self._in_flight = (jobs, self._executor.submit(compute))

    def collect(self) -> list[TensorJob]:
        """Wait for the window in flight and keep its results (its error, if any, is raised here); its tensors."""
        if self._in_flight is None:
            return []
        jobs, future = self._in_flight
        self._in_flight = None
        self.keep(jobs, future.result())
        return jobs

    def _drop_in_flight(self) -> None:
        """Forget the window in flight; one already running is waited for (its error dropped with it), so its
        tensors are out of use before the thread takes another window."""
        if self._in_flight is None:
            return
        future = self._in_flight[1]
        self._in_flight = None
        if not future.cancel():
            future.exception()

    def close(self) -> None:
        """Stop the background thread (a window still in flight is waited for and dropped)."""
        self._drop_in_flight()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
