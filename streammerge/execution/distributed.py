"""Many processes, one job: ranks launched by ``torchrun``, the output units split by bytes.

``torchrun --nproc-per-node N -m streammerge merge …`` (or ``--nnodes M --node-rank i`` on
machines sharing the output filesystem) starts one process per rank.  Every rank plans the same
job; the units are split across ranks by bytes (``split_units``: a function of the plan and the
world size only, so a resumed job may use any world size); each rank writes and journals its own
units.  Rank 0 holds the output lock for the whole job, opens the job (the resume decision, the
pre-flight checks) and tells the others what is already done; at the end it waits for every rank,
folds their journals into its own and writes the files that need every unit, the recipe, the card
and the ``complete`` record.  The layout never depends on the world size, so the output bytes are
those of a single-process run.

The ranks talk through torch.distributed's key-value store (the one ``torchrun`` runs): a rank
that fails posts its error and every other rank raises it at its next unit or wait; every rank
posts a heartbeat, so a rank killed outright is noticed within ``STREAMMERGE_DIST_TIMEOUT``
seconds (default 120) and no rank waits forever.  Before each unit a rank r > 0 also checks that
the output directory is still locked (rank 0 is alive) and that the journal is still this job's.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
import torch.distributed as dist

from ..errors import DistributedError
from ..jobs.lock import is_locked
from ..names import JOURNAL_NAME
from ..planning.describe import format_size
from ..sinks.base import OutputUnit

__all__ = ["RankInfo", "Cohort", "detect_ranks", "unit_bytes", "split_units", "describe_split", "TIMEOUT_ENV"]

TIMEOUT_ENV = "STREAMMERGE_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 120.0
HEARTBEAT_S = 1.0
POLL_S = 0.1


@dataclass(frozen=True)
class RankInfo:
    """Where this process stands in the job, from torchrun's environment."""

    rank: int
    world_size: int
    local_rank: int


def detect_ranks(environ: Mapping[str, str] = os.environ) -> RankInfo | None:
    """``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` as torchrun sets them; None for a single process.

    Raises:
        DistributedError: the variables are set but malformed.
    """
    if "WORLD_SIZE" not in environ or "RANK" not in environ:
        return None
    try:
        rank, world, local = int(environ["RANK"]), int(environ["WORLD_SIZE"]), int(environ.get("LOCAL_RANK", "0"))
    except ValueError:
        raise DistributedError(f"RANK={environ['RANK']!r} / WORLD_SIZE={environ['WORLD_SIZE']!r} are not integers; "
                               "launch distributed jobs with torchrun") from None
    if not 0 <= rank < world:
        raise DistributedError(f"RANK={rank} is outside WORLD_SIZE={world}; launch distributed jobs with torchrun")
    return None if world == 1 else RankInfo(rank, world, local)


def unit_bytes(unit: OutputUnit) -> int:
    """The bytes a unit holds: its planned size, else the sum of its tensors' output bytes."""
    return unit.size if unit.size is not None else sum(t.out_bytes for t in unit.tensors)


def split_units(units: Sequence[OutputUnit], world_size: int) -> list[tuple[int, ...]]:
    """Each rank's unit indices (ascending): largest unit first to the least-loaded rank (ties: lower rank).

    Depends only on the units (the plan) and ``world_size``.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    load = [0] * world_size
    owned: list[list[int]] = [[] for _ in range(world_size)]
    for index in sorted(range(len(units)), key=lambda i: (-unit_bytes(units[i]), i)):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        load[rank] += unit_bytes(units[index])
        owned[rank].append(index)
    return [tuple(sorted(o)) for o in owned]


def describe_split(units: Sequence[OutputUnit], world_size: int) -> str:
    """``streammerge plan``'s lines: which units each rank writes and how many bytes."""
    lines = [f"per-rank split (world size {world_size}, by output bytes; any world size resumes the job):"]
    for rank, indices in enumerate(split_units(units, world_size)):
        names = [units[i].file_name for i in indices]
        shown = ", ".join(names[:3]) + (f", … ({len(names) - 3} more)" if len(names) > 3 else "")
        total = sum(unit_bytes(units[i]) for i in indices)
        lines.append(f"  rank {rank}: {len(names)} unit(s), {format_size(total)}" + (f": {shown}" if names else ""))
    return "\n".join(lines)


def _timeout_s(environ: Mapping[str, str]) -> float:
    text = environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_S))
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise DistributedError(f"{TIMEOUT_ENV}={text!r}: expected a positive number of seconds")
    return value


class Cohort:
    """The ranks of one job: the process group, the store they talk through, and what they tell each other.

    Use as a context manager around the job: on the way out an exception is posted to every rank.
    """

    def __init__(self, info: RankInfo, device: torch.device, environ: Mapping[str, str] = os.environ) -> None:
        self.rank, self.world_size, self.local_rank = info.rank, info.world_size, info.local_rank
        self.device = device
        self.timeout_s = _timeout_s(environ)
        self._environ = dict(environ)
        self._store: Any = None
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    # --- lifecycle --------------------------------------------------------------------------

    def _connect(self) -> Any:
        try:
            host, port = self._environ["MASTER_ADDR"], int(self._environ["MASTER_PORT"])
        except (KeyError, ValueError):
            raise DistributedError("MASTER_ADDR / MASTER_PORT are not set; launch distributed jobs with torchrun") \
                from None
        agent = self._environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"  # torchrun hosts the store
        master = self.rank == 0 and not agent and self._store is None
        store = dist.TCPStore(host, port, self.world_size if master else None, master,
                              timeout=timedelta(seconds=self.timeout_s))
        run = f"{self._environ.get('TORCHELASTIC_RUN_ID', 'none')}/{self._environ.get('TORCHELASTIC_RESTART_COUNT', 0)}"
        return dist.PrefixStore(f"streammerge/{run}/", store)

    def __enter__(self) -> Cohort:
        if self.device.type == "cuda":
            torch.cuda.set_device(self.local_rank)
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        try:
            self._store = self._connect()
            dist.init_process_group(backend, store=dist.PrefixStore("pg/", self._store), rank=self.rank,
                                    world_size=self.world_size, timeout=timedelta(seconds=self.timeout_s))
            dist.barrier(device_ids=[self.local_rank] if backend == "nccl" else None)
        except (RuntimeError, OSError) as e:  # DistStoreError / DistNetworkError are RuntimeErrors
            raise DistributedError(f"rank {self.rank} could not join the job's {self.world_size} ranks within "
                                   f"{self.timeout_s:.0f} s ({backend}): {e}") from e
        beat_store = self._connect()
        self._beat = threading.Thread(target=self._heartbeat, args=(beat_store,), daemon=True,
                                      name="streammerge-heartbeat")
        self._beat.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc is not None and self._store is not None:
            try:  # the first error is the one every rank reports
                self._store.compare_set("failed", "", f"rank {self.rank}: {type(exc).__name__}: {exc}")
            except RuntimeError:
                pass  # the store is gone too: the other ranks notice the silence
        self._stop.set()
        if exc is None and dist.is_initialized():  # after a failure the process exits: no collective teardown
            dist.destroy_process_group()

    def _heartbeat(self, store: Any) -> None:
        try:
            while not self._stop.wait(HEARTBEAT_S):
                store.add(f"beat/{self.rank}", 1)
        except RuntimeError:
            return  # the store is gone: the main thread's next wait or check says so

    # --- what the ranks tell each other -----------------------------------------------------

    def mine(self, units: Sequence[OutputUnit]) -> set[str]:
        """The names of the units this rank writes."""
        return {units[i].file_name for i in split_units(units, self.world_size)[self.rank]}

    def check(self) -> None:
        """Raise the error another rank posted, if any."""
        if self._store.check(["failed"]):
            raise DistributedError(f"stopping: {self._store.get('failed').decode()}")

    def _wait(self, keys: list[str], ranks: Sequence[int], what: str) -> None:
        """Until every key is set; raise when a rank posts an error or ``ranks`` fall silent."""
        seen = {r: (-1, time.monotonic()) for r in ranks}
        while True:
            self.check()
            if self._store.check(keys):
                return
            now = time.monotonic()
            for r in ranks:
                beat = self._store.add(f"beat/{r}", 0)
                if beat != seen[r][0]:
                    seen[r] = (beat, now)
                elif now - seen[r][1] > self.timeout_s:
                    raise DistributedError(f"rank {r} has not answered for {self.timeout_s:.0f} s while rank "
                                           f"{self.rank} waited for {what} (killed, or its machine is gone); "
                                           f"re-run the same command to resume the job (any world size)")
            time.sleep(POLL_S)

    def announce(self, start: dict[str, Any]) -> None:
        """Rank 0: the job is open (``start``: complete, done unit names, journal identity)."""
        self._store.set("start", json.dumps(start))

    def receive(self) -> dict[str, Any]:
        """Rank r > 0: what rank 0 announced."""
        self._wait(["start"], [0], "rank 0 to open the job")
        return json.loads(self._store.get("start").decode())

    def check_job(self, out_dir: Path, journal_inode: int) -> None:
        """Rank r > 0, before each unit: nobody failed, rank 0 still holds the lock, the journal is this job's."""
        self.check()
        if not is_locked(out_dir):
            raise DistributedError(f"rank {self.rank}: the output directory {str(out_dir)!r} is no longer locked, "
                                   "so rank 0 has stopped; this rank stops writing (re-run to resume)")
        try:
            inode = (out_dir / JOURNAL_NAME).stat().st_ino
        except OSError:
            inode = -1
        if inode != journal_inode:
            raise DistributedError(f"rank {self.rank}: the job journal in {str(out_dir)!r} was replaced (another "
                                   "job took over the directory); this rank stops writing")

    def wait_for_ranks(self) -> None:
        """Rank 0: until every other rank has journaled its units."""
        others = range(1, self.world_size)
        self._wait([f"done/{r}" for r in others], others, "the other ranks to finish their units")

    def done_then_wait(self) -> None:
        """Rank r > 0: say its units are journaled, then wait until rank 0 has finished the job."""
        self._store.set(f"done/{self.rank}", "1")
        self._wait(["finished"], [0], "rank 0 to finish the job")

    def finished(self) -> None:
        """Rank 0: the job is complete (or was already)."""
        self._store.set("finished", "1")
