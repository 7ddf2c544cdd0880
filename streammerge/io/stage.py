"""A background stage that runs work items in order, behind a bounded queue.

The engine computes merged blocks on the calling thread and hands their writes (and the
byte copies of untouched tensors) to this stage, so disk writes and checksumming overlap
with the next tensor's read and merge.  The queue is bounded, which bounds the memory in
flight; an error in the stage is re-raised on the caller's next call.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from types import TracebackType

_STOP = object()


class OrderedStage:
    """Runs submitted zero-argument callables one at a time, in submission order, on one thread."""

    def __init__(self, name: str, max_pending: int = 2) -> None:
        self._queue: queue.Queue[object] = queue.Queue(maxsize=max(1, max_pending))
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            if isinstance(item, threading.Event):
                item.set()  # a barrier from drain(): always released, even after a failure
            elif self._error is None:
                try:
                    item()  # type: ignore[operator]
                except BaseException as e:  # noqa: BLE001 - re-raised on the submitting thread
                    self._error = e

    def _raise_pending(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def submit(self, work: Callable[[], None]) -> None:
        """Queue ``work``; blocks while ``max_pending`` items wait. Re-raises an earlier failure."""
        self._raise_pending()
        self._queue.put(work)

    def drain(self) -> None:
        """Wait until everything submitted has run; re-raise its failure, if any."""
        done = threading.Event()
        self._queue.put(done)
        done.wait()
        self._raise_pending()

    def close(self) -> None:
        self._queue.put(_STOP)
        self._thread.join()

    def __enter__(self) -> OrderedStage:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is not None and self._error is None:
            self._error = exc  # skip queued work after a failure on the submitting side
        self.close()
