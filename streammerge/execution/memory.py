"""Peak memory of this process, sampled in the background.

Two figures: RSS (everything resident in our page tables, including pages of the memory-mapped
input shards while a tensor is read from them) and *anonymous* RSS (memory we allocated: tensors,
buffers, the interpreter), which is what competes with other programs — mapped file pages are
page cache the kernel can drop.  On Linux both come from ``/proc/self/status`` (``VmRSS``,
``RssAnon``); elsewhere anonymous RSS is not available and equals RSS.
"""

from __future__ import annotations

import threading
from pathlib import Path
from types import TracebackType

import psutil

_STATUS = Path("/proc/self/status")


def _status_kib(text: str, field: str) -> int | None:
    for line in text.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None


class PeakMemoryMonitor:
    """Samples RSS and anonymous RSS every ``interval`` seconds while active; keeps the maxima.

    ``peak_rss`` is an upper bound on the memory the job holds (the reader releases mapped
    pages after each tensor, so they do not accumulate); ``peak_anon_rss`` leaves mapped file
    pages out.
    """

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.peak_rss = 0
        self.peak_anon_rss = 0
        self._process = psutil.Process()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="streammerge-memory", daemon=True)

    def sample(self) -> int:
        """Take one sample; returns the current RSS in bytes."""
        try:
            text = _STATUS.read_text()
            rss_kib, anon_kib = _status_kib(text, "VmRSS"), _status_kib(text, "RssAnon")
        except OSError:
            rss_kib = anon_kib = None
        rss = rss_kib * 1024 if rss_kib is not None else self._process.memory_info().rss
        anon = anon_kib * 1024 if anon_kib is not None else rss
        self.peak_rss = max(self.peak_rss, rss)
        self.peak_anon_rss = max(self.peak_anon_rss, anon)
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
