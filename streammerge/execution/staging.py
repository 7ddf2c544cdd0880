"""Moving tensor bytes between the memory-mapped inputs, the worker device and the writer.

One code path for every device:

- **in** (``Staging.load``): a tensor's stored bytes (bf16 / fp16 / fp32 / fp8; a whole tensor or a
  row block) are a view of the memory map.  They are *staged* (CUDA: copied into pinned host
  memory; CPU: the map itself is the staging buffer), *moved* to the device (CUDA: ``non_blocking``
  on a copy stream the compute stream then waits for; CPU: nothing to move) and *converted* to fp32
  there, into a fresh tensor or into the reused fp32 work buffer of the current row block.
- **out** (``Staging.unload``): a merged fp32 block is cast to the output dtype on the device and
  copied into a host buffer (CUDA: pinned, on the copy stream, so the copy runs while the next
  block computes; CPU: the cast writes the host buffer directly).  ``host_blocks`` hands the
  finished host blocks on in order, waiting for a copy only once the next block's work is queued.

On the CPU this is exactly one conversion from the map and one cast per block, as before, but
into buffers that are reused: a fresh 64 MiB tensor per block costs page faults that take several
times the conversion itself (``benchmarks/profile_merge.py``, elementary costs).  Host output
buffers are reused only once nobody else (the writer, a sink) holds their storage.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from ..io.reader import BLOCK_BYTES
from ..planning.budget import WRITE_QUEUE_DEPTH

__all__ = ["HostBufferPool", "Pending", "Staging"]

# Output blocks alive at once outside the worker: the writer's queue, the one being written, the one
# the stage's loop variable still holds, the one the sink is handing over.
HOST_BUFFERS = WRITE_QUEUE_DEPTH + 3
_USE_COUNT = getattr(torch._C, "_storage_Use_Count", None)  # absent: no reuse, fresh tensors


def _storage_users(tensor: torch.Tensor) -> int:
    assert _USE_COUNT is not None
    return int(_USE_COUNT(tensor.untyped_storage()._cdata))


class HostBufferPool:
    """Reusable CPU buffers of ``capacity`` bytes: a buffer is handed out again only when no tensor
    (a block the writer still holds, a NumPy view of it) shares its storage any more."""

    def __init__(self, capacity: int = BLOCK_BYTES, size: int | None = None) -> None:
        self.capacity = capacity
        self.size = (HOST_BUFFERS if size is None else size) if _USE_COUNT is not None else 0
        self._buffers: list[torch.Tensor] = []
        self._idle_users = 0

    def empty(self, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised CPU tensor: a view of a free buffer, or a fresh tensor when none is free."""
        numel = 1
        for d in shape:
            numel *= d
        nbytes = numel * dtype.itemsize
        if not 0 < nbytes <= self.capacity or self.size == 0:
            return torch.empty(shape, dtype=dtype)
        buffer = next((b for b in self._buffers if _storage_users(b) == self._idle_users), None)
        if buffer is None:
            if len(self._buffers) >= self.size:
                return torch.empty(shape, dtype=dtype)
            buffer = torch.empty(self.capacity, dtype=torch.uint8)
            self._idle_users = _storage_users(buffer)
            self._buffers.append(buffer)
        return buffer[:nbytes].view(dtype).view(shape)


@dataclass
class Pending:
    """A host block whose copy from the device may still be running (``event``; None: done)."""

    host: torch.Tensor
    event: torch.cuda.Event | None = None

    def result(self) -> torch.Tensor:
        if self.event is not None:
            self.event.synchronize()
        return self.host


class Staging:
    """The transfers of one worker device: stored bytes in, merged blocks out (see the module docstring)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.lag = 1 if self.cuda else 0  # host blocks waited for one block later: the copy overlaps compute
        self._copy_stream = torch.cuda.Stream(device) if self.cuda else None
        self._host = HostBufferPool()
        self._work: dict[int, torch.Tensor] = {}

    def load(self, stored: torch.Tensor, work: bool = False, slot: int = 0) -> torch.Tensor:
        """``stored`` (a view of the memory map, stored dtype) as fp32 on the device.

        ``work``: into the reused fp32 work buffer number ``slot`` (valid until the next ``load(work=True)``
        into the same slot); otherwise into a fresh tensor.  A dense method's row blocks hold the base rows
        and one delta per dense input at once: one slot each.
        """
        moved = self._move(self._stage(stored))
        if work:
            target = self._work_view(moved.shape, slot)
        else:
            target = torch.empty(moved.shape, dtype=torch.float32, device=self.device)
        return target.copy_(moved)

    def _stage(self, stored: torch.Tensor) -> torch.Tensor:
        if not self.cuda:
            return stored  # the map is the staging buffer: converted straight from it
        return torch.empty(stored.shape, dtype=stored.dtype, pin_memory=True).copy_(stored)

    def _move(self, staged: torch.Tensor) -> torch.Tensor:
        if self._copy_stream is None:
            return staged
        compute = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self._copy_stream):
            moved = staged.to(self.device, non_blocking=True)  # the host allocator keeps `staged` until done
        compute.wait_stream(self._copy_stream)
        moved.record_stream(compute)
        return moved

    def _work_view(self, shape: torch.Size, slot: int = 0) -> torch.Tensor:
        numel = shape.numel()
        if numel > BLOCK_BYTES // 4:
            return torch.empty(shape, dtype=torch.float32, device=self.device)  # one row larger than a block
        work = self._work.get(slot)
        if work is None:
            work = self._work[slot] = torch.empty(BLOCK_BYTES // 4, dtype=torch.float32, device=self.device)
        return work[:numel].view(shape)

    def unload(self, block: torch.Tensor, dtype: torch.dtype) -> Pending:
        """``block`` (fp32, on the device) cast to ``dtype`` into a host buffer."""
        if self._copy_stream is None:
            return Pending(self._host.empty(block.shape, dtype).copy_(block))
        cast = block.to(dtype)
        host = torch.empty(block.shape, dtype=dtype, pin_memory=True)
        compute = torch.cuda.current_stream(self.device)
        self._copy_stream.wait_stream(compute)
        with torch.cuda.stream(self._copy_stream):
            host.copy_(cast, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        cast.record_stream(self._copy_stream)
        return Pending(host, event)

    def host_blocks(self, pending: Iterable[Pending]) -> Iterator[torch.Tensor]:
        """The host blocks in order; each one is waited for after the next one's work is queued (CUDA)."""
        waiting: deque[Pending] = deque()
        for p in pending:
            waiting.append(p)
            if len(waiting) > self.lag:
                yield waiting.popleft().result()
        while waiting:
            yield waiting.popleft().result()
