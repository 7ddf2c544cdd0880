"""Peak memory of this process, sampled in the background with psutil."""

from __future__ import annotations

import threading
from types import TracebackType

import psutil


class PeakMemoryMonitor:
    """Samples RSS every ``interval`` seconds while active; ``peak_rss`` is the maximum seen.

    RSS here excludes nothing, so it is an upper bound on the memory the job holds (the
    reader releases mapped pages after each tensor, so they do not accumulate).
    """

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.peak_rss = 0
        self._process = psutil.Process()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="streammerge-memory", daemon=True)

    def sample(self) -> int:
        rss = self._process.memory_info().rss
        self.peak_rss = max(self.peak_rss, rss)
        return rss

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> PeakMemoryMonitor:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()
