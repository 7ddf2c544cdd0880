"""A streaming safetensors writer: header first, then one tensor at a time.

``safetensors.torch.save_file`` needs every tensor in memory at once.  Here the header is
computed from names, dtypes and shapes alone (``layout_shard``), written first, and the
tensors follow one by one in file order.  The result is byte-identical to ``save_file``
with the same tensors and metadata: same ordering (descending dtype, then name), same
compact JSON, same space padding of the header to a multiple of 8 bytes.

A shard is written to ``<name>.partial``, fsynced and renamed only when every tensor is in.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import torch

from ..errors import OutputError
from ..jobs.faults import kill_point
from ..names import DEFAULT_METADATA, INDEX_NAME, METADATA_KEY
from .atomic import fsync_dir, partial_path, write_bytes_atomic, write_error
from .dtypes import DTYPES, byte_size, safetensors_name

# Written bytes between write-backs (fdatasync + drop from the page cache).
WRITEBACK_BYTES = 256 << 20
# Bytes hashed and written at a time (fits the CPU cache).
PUT_PIECE_BYTES = 1 << 20


@dataclass(frozen=True)
class TensorSlot:
    """A tensor's place in a shard being written; offsets are relative to the data buffer."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class ShardLayout:
    """The complete byte layout of one safetensors file, known before any tensor is read."""

    slots: tuple[TensorSlot, ...]
    header: bytes

    @property
    def data_size(self) -> int:
        return self.slots[-1].end if self.slots else 0

    @property
    def file_size(self) -> int:
        return len(self.header) + self.data_size


def layout_shard(
    entries: Iterable[tuple[str, str, tuple[int, ...]]],
    metadata: Mapping[str, str] | None = DEFAULT_METADATA,
    keep_order: bool = False,
) -> ShardLayout:
    """Lay out tensors ``(name, dtype, shape)`` exactly as safetensors' ``save_file`` would.

    Args:
        keep_order: lay the tensors out in the order given instead of ``save_file``'s (descending
            dtype, then name); safetensors readers accept any order of contiguous data offsets.

    Returns:
        The slots in file order and the header bytes (length prefix included).
    """
    ordered = list(entries) if keep_order else sorted(entries, key=lambda e: (-DTYPES[e[1]].rank, e[0]))
    doc: dict[str, object] = {}
    if metadata:
        doc[METADATA_KEY] = dict(metadata)
    slots = []
    offset = 0
    for name, dtype, shape in ordered:
        size = byte_size(dtype, shape)
        slots.append(TensorSlot(name, dtype, tuple(shape), offset, offset + size))
        doc[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    body = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    body += b" " * (-len(body) % 8)
    return ShardLayout(slots=tuple(slots), header=struct.pack("<Q", len(body)) + body)


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A zero-copy little-endian byte view of a CPU tensor (made contiguous if needed)."""
    flat = tensor.detach().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


class ShardWriter:
    """Writes one shard in layout order; use as a context manager.

    ``write_tensor`` / ``write_bytes`` must be called in slot order; a tensor may be
    given in several ``write_bytes`` chunks.  ``commit`` checks that every byte was written,
    fsyncs and renames the partial file into place and returns the file's SHA-256.
    Leaving the context without ``commit`` deletes the partial file.
    """

    def __init__(self, path: Path, layout: ShardLayout) -> None:
        self.path = Path(path)
        self.layout = layout
        self._tmp = partial_path(self.path)
        self._slot_index = 0
        self._started = False  # whether any write has reached slot _slot_index yet
        self._filled = 0  # bytes written into the current slot
        self._sha = hashlib.sha256()
        self._unsynced = 0
        self._committed = False
        try:
            self._file = open(self._tmp, "wb")
        except OSError as e:
            raise OutputError(f"cannot create {str(self._tmp)!r}: {e.strerror or e}") from e
        try:
            self._put(layout.header)
        except OutputError:
            self.abort()
            raise

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if not self._committed:
            self.abort()

    def _advance_to(self, name: str) -> TensorSlot | None:
        """The slot for ``name``: the current one, or the next once the current is full."""
        slots = self.layout.slots
        i = self._slot_index
        if i < len(slots) and slots[i].name == name and self._started:
            return slots[i]
        if self._started:
            if self._filled != slots[i].nbytes:
                return None
            i += 1
        if i < len(slots) and slots[i].name == name:
            self._slot_index, self._filled, self._started = i, 0, True
            return slots[i]
        return None

    def _first_unwritten(self) -> TensorSlot | None:
        slots = self.layout.slots
        if not self._started:
            return slots[0] if slots else None
        if self._filled != slots[self._slot_index].nbytes:
            return slots[self._slot_index]
        nxt = self._slot_index + 1
        return slots[nxt] if nxt < len(slots) else None

    def write_tensor(self, name: str, tensor: torch.Tensor) -> None:
        """Write a whole tensor; its name, dtype and shape must match the next slot."""
        slot = self._expect(name)
        dtype = safetensors_name(tensor.dtype)
        if dtype != slot.dtype or tuple(tensor.shape) != slot.shape:
            raise OutputError(
                f"internal error writing {str(self.path)!r}: tensor {name!r} is {dtype} {tuple(tensor.shape)}, "
                f"the header promised {slot.dtype} {slot.shape}")
        self.write_bytes(name, tensor_bytes(tensor))

    def write_tensor_block(self, name: str, block: torch.Tensor) -> None:
        """Write the next rows of tensor ``name``; the dtype must match its slot."""
        slot = self._expect(name)
        dtype = safetensors_name(block.dtype)
        if dtype != slot.dtype:
            raise OutputError(f"internal error writing {str(self.path)!r}: a block of {name!r} is {dtype}, "
                              f"the header promised {slot.dtype}")
        self.write_bytes(name, tensor_bytes(block))

    def write_bytes(self, name: str, data: bytes | memoryview) -> None:
        """Write (part of) the raw bytes of tensor ``name``."""
        slot = self._expect(name)
        if self._filled + len(data) > slot.nbytes:
            raise OutputError(
                f"internal error writing {str(self.path)!r}: {self._filled + len(data)} bytes for tensor "
                f"{name!r}, its slot holds {slot.nbytes}")
        self._put(data)
        self._filled += len(data)

    def commit(self) -> str:
        """Finish the shard: verify completeness, fsync, rename. Returns the file SHA-256."""
        missing = self._first_unwritten()
        if missing is not None:
            raise OutputError(f"internal error: shard {str(self.path)!r} is missing tensor {missing.name!r}")
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            os.replace(self._tmp, self.path)
        except OSError as e:
            self.abort()
            raise write_error(self.path, e) from e
        fsync_dir(self.path.parent)
        self._committed = True
        return self._sha.hexdigest()

    def abort(self) -> None:
        """Close and delete the partial file."""
        try:
            self._file.close()
        except (OSError, AttributeError):
            pass
        self._tmp.unlink(missing_ok=True)

    def _expect(self, name: str) -> TensorSlot:
        slot = self._advance_to(name)
        if slot is None:
            pending = self._first_unwritten()
            expected = pending.name if pending else "nothing (the shard is full)"
            raise OutputError(f"internal error writing {str(self.path)!r}: got tensor {name!r}, expected {expected!r}")
        return slot

    def _put(self, data: bytes | memoryview) -> None:
        """Hash and write ``data`` piece by piece, so each piece is read from memory once and hashed and
        written while it is in the CPU cache (measured: a 32 MiB block takes 65–80 ms of CPU written and
        hashed whole, 28 ms in 1 MiB pieces)."""
        view = memoryview(data).cast("B") if not isinstance(data, bytes) else memoryview(data)
        try:
            for start in range(0, len(view), PUT_PIECE_BYTES):
                piece = view[start:start + PUT_PIECE_BYTES]
                self._sha.update(piece)
                self._file.write(piece)
            self._unsynced += len(view)
            if self._unsynced >= WRITEBACK_BYTES:
                self._write_back()
        except OSError as e:
            raise write_error(self._tmp, e) from e
        kill_point("bytes", len(view))

    def _write_back(self) -> None:
        """Flush what is written so far to disk and drop it from the page cache.

        Without this, a 5 GB shard sits as dirty page cache until the final fsync: memory
        that looks like ours, and one long stall at the end instead of steady writes.
        """
        self._file.flush()
        fd = self._file.fileno()
        os.fdatasync(fd)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        self._unsynced = 0


def index_bytes(weight_map: Mapping[str, str], total_size: int) -> bytes:
    """The ``model.safetensors.index.json`` document, formatted as transformers writes it."""
    doc = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode("utf-8")


def write_index(directory: Path, weight_map: Mapping[str, str], total_size: int) -> Path:
    """Atomically write the shard index of a sharded model into ``directory``."""
    path = Path(directory) / INDEX_NAME
    write_bytes_atomic(path, index_bytes(weight_map, total_size))
    fsync_dir(path.parent)
    return path


def save_tensors(path: Path, tensors: Mapping[str, torch.Tensor],
                 metadata: Mapping[str, str] | None = DEFAULT_METADATA) -> str:
    """Write a small dict of tensors with the streaming writer (tests, tools, adapters)."""
    layout = layout_shard(((n, safetensors_name(t.dtype), tuple(t.shape)) for n, t in tensors.items()), metadata)
    with ShardWriter(path, layout) as writer:
        for slot in layout.slots:
            writer.write_tensor(slot.name, tensors[slot.name])
        return writer.commit()
