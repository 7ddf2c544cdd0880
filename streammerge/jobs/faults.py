"""Crash injection for the resume tests: SIGKILL this process at a chosen point of a job.

Tests set ``STREAMMERGE_TEST_KILL_AT=<point>:<n>`` (or call ``arm`` in a forked child) and
check that re-running the job gives the same bytes as an uninterrupted run.  Points:

- ``bytes``: once ``n`` bytes of shard data (headers included) have been written, i.e. in
  the middle of a shard;
- ``shard``: after the ``n``-th shard is renamed into place, before its journal record;
- ``record``: after the ``n``-th journal record is on disk;
- ``file``: after the ``n``-th config / index / recipe / model card file is written;
- ``rows``: after the ``n``-th merged row block of a dense method's second pass (its first pass
  over the tensor done), before the block is handed to the sink.

In a distributed job ``STREAMMERGE_TEST_KILL_RANK=<r>`` arms only the process whose ``RANK``
is ``r``, and ``STREAMMERGE_TEST_FAULT=raise`` raises ``InjectedFault`` there instead of
killing (a rank that fails with an error rather than dying).

Unset (always, outside tests), every ``kill_point`` call is one comparison.
"""

from __future__ import annotations

import os
import signal

__all__ = ["KILL_ENV", "KILL_RANK_ENV", "FAULT_ENV", "POINTS", "InjectedFault", "arm", "kill_point"]

KILL_ENV = "STREAMMERGE_TEST_KILL_AT"
KILL_RANK_ENV = "STREAMMERGE_TEST_KILL_RANK"
FAULT_ENV = "STREAMMERGE_TEST_FAULT"
POINTS = ("bytes", "shard", "record", "file", "rows")

_target: tuple[str, int] | None = None
_count = 0
_raise = False


class InjectedFault(RuntimeError):
    """Raised at the armed point when ``STREAMMERGE_TEST_FAULT=raise``."""


def arm(spec: str | None, raise_instead: bool = False) -> None:
    """Kill (or raise ``InjectedFault``) at ``"<point>:<n>"``; None disarms. Raises ValueError for a malformed spec."""
    global _target, _count, _raise
    _count = 0
    _raise = raise_instead
    if not spec:
        _target = None
        return
    point, _, n = spec.partition(":")
    if point not in POINTS or not n.isdigit():
        raise ValueError(f"{KILL_ENV}={spec!r}: expected <point>:<n> with point one of {POINTS}")
    _target = (point, int(n))


def kill_point(point: str, amount: int = 1) -> None:
    """Count ``amount`` at ``point``; SIGKILL the process once the armed count is reached."""
    global _count, _target
    if _target is None or _target[0] != point:
        return
    _count += amount
    if _count >= _target[1]:
        if _raise:
            _target = None
            raise InjectedFault(f"injected fault at {point}:{_count} ({KILL_ENV})")
        os.kill(os.getpid(), signal.SIGKILL)


if os.environ.get(KILL_RANK_ENV) in (None, os.environ.get("RANK")):
    arm(os.environ.get(KILL_ENV), os.environ.get(FAULT_ENV) == "raise")
