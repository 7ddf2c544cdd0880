"""Lazy, one-tensor-at-a-time reading of safetensors checkpoints.

A checkpoint is a single ``model.safetensors`` or shards listed by
``model.safetensors.index.json``.  Headers are parsed and validated up front
(``header.read_header``) so planning needs no tensor data.  Tensor bytes are read through
our own read-only memory map of each shard; after a tensor is copied out, its pages are
released with ``madvise(MADV_DONTNEED)`` so mapped pages never pile up in the process's
resident set (safetensors' ``safe_open`` keeps its map, and thus RSS, growing to the shard
size).
"""

from __future__ import annotations

import json
import mmap
import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import torch

from ..errors import InputError, SafetensorsFormatError
from ..names import INDEX_NAME, PICKLE_WEIGHT_SUFFIXES, SAFETENSORS_SUFFIX, SINGLE_FILE_NAME
from .dtypes import DTYPES
from .header import SafetensorsHeader, TensorInfo, read_header

# Bytes of one block of work: fp32 row blocks of merged tensors, copy chunks, NaN-check blocks.
BLOCK_BYTES = 64 << 20
COPY_CHUNK_BYTES = BLOCK_BYTES

_PAGE = mmap.PAGESIZE


@dataclass(frozen=True)
class CheckpointLayout:
    """Which shard holds which tensor: the validated headers of a checkpoint."""

    root: Path
    shards: tuple[Path, ...]
    headers: dict[Path, SafetensorsHeader]
    shard_of: dict[str, Path]
    index_path: Path | None

    def info(self, name: str) -> TensorInfo:
        return self.headers[self.shard_of[name]].tensors[name]

    @property
    def tensor_names(self) -> list[str]:
        return list(self.shard_of)

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for h in self.headers.values() for t in h.tensors.values())


def _inside(root: Path, candidate: Path) -> bool:
    """Whether ``candidate``, a file an index names, stays inside the model directory ``root``.

    Its folders must resolve inside ``root``, and so must the file when it is a symlink —
    except in the Hugging Face cache, where ``snapshots/<commit>/<file>`` links to
    ``../../blobs/<sha256>`` of the same repository.
    """
    real_root = root.resolve()
    if not candidate.parent.resolve().is_relative_to(real_root):
        return False
    allowed = [real_root]
    if real_root.parent.name == "snapshots":
        allowed.append(real_root.parent.parent / "blobs")
    target = candidate.resolve()
    return any(target.is_relative_to(folder) for folder in allowed)


def _load_index(root: Path, index_path: Path) -> dict[str, str]:
    try:
        doc = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise SafetensorsFormatError(f"cannot read shard index {str(index_path)!r}: {str(e)[:300]}") from e
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise SafetensorsFormatError(
            f"shard index {str(index_path)!r} must hold a \"weight_map\" object of tensor name -> shard file name")
    for name, shard in weight_map.items():
        target = root / shard
        if os.path.isabs(shard) or ".." in Path(shard).parts or not _inside(root, target):
            raise SafetensorsFormatError(
                f"shard index {str(index_path)!r} maps tensor {name!r} to {shard!r}, outside the model directory "
                "(a path with '..', an absolute path, or a symlink that leads out of it); refusing to read it")
    return weight_map


def open_checkpoint(path: str | os.PathLike[str]) -> CheckpointLayout:
    """Find and validate the safetensors files of a model directory (or a single file).

    Raises:
        InputError: no safetensors weights (pickle-only checkpoints are named as such).
        SafetensorsFormatError: a malformed header or index, a missing shard, an index
            entry whose tensor is not in its shard, or a tensor stored in two shards.
    """
    root = Path(path)
    if root.is_file():
        header = read_header(root)
        return CheckpointLayout(root=root.parent, shards=(root,), headers={root: header},
                                shard_of={n: root for n in header.tensors}, index_path=None)
    if not root.is_dir():
        raise InputError(f"model path {str(root)!r} does not exist")
    index_path = root / INDEX_NAME
    if index_path.is_file():
        weight_map = _load_index(root, index_path)
        shard_names = list(dict.fromkeys(weight_map.values()))
        headers: dict[Path, SafetensorsHeader] = {}
        for shard in shard_names:
            shard_path = root / shard
            if not shard_path.is_file():
                raise SafetensorsFormatError(
                    f"shard index {str(index_path)!r} names {shard!r}, which does not exist in {str(root)!r}")
            headers[shard_path] = read_header(shard_path)
        shard_of: dict[str, Path] = {}
        for name, shard in weight_map.items():
            shard_path = root / shard
            if name not in headers[shard_path].tensors:
                raise SafetensorsFormatError(
                    f"shard index {str(index_path)!r} places tensor {name!r} in {shard!r}, but that shard has no such tensor")
            shard_of[name] = shard_path
        return CheckpointLayout(root, tuple(headers), headers, shard_of, index_path)
    single = root / SINGLE_FILE_NAME
    if single.is_file():
        header = read_header(single)
        return CheckpointLayout(root, (single,), {single: header}, {n: single for n in header.tensors}, None)
    pickles = sorted(p.name for p in root.iterdir() if p.suffix in PICKLE_WEIGHT_SUFFIXES)
    others = sorted(p.name for p in root.iterdir() if p.suffix == SAFETENSORS_SUFFIX)
    if others:
        raise InputError(
            f"{str(root)!r} has safetensors files {others[:5]} but neither {SINGLE_FILE_NAME!r} nor {INDEX_NAME!r}; "
            "rename the single file to model.safetensors or add an index")
    if pickles:
        raise InputError(
            f"{str(root)!r} holds only pickle weights {pickles[:5]}; streammerge reads models as safetensors only "
            "(a pickle can run code when loaded; --allow-pickle covers adapters only). Convert the model first, "
            "e.g. with transformers: from_pretrained(...).save_pretrained(out, safe_serialization=True).")
    raise InputError(f"{str(root)!r} holds no model weights ({SINGLE_FILE_NAME!r} or {INDEX_NAME!r} expected)")


class CheckpointReader:
    """Reads tensors of a checkpoint one at a time; use as a context manager."""

    def __init__(self, layout: CheckpointLayout) -> None:
        self.layout = layout
        self._maps: dict[Path, tuple[object, mmap.mmap]] = {}

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        for f, mm in self._maps.values():
            try:
                mm.close()
            except BufferError:
                pass  # a tensor view is still alive; the map closes when it is collected
            f.close()  # type: ignore[attr-defined]
        self._maps.clear()

    def _map(self, shard: Path) -> mmap.mmap:
        entry = self._maps.get(shard)
        if entry is None:
            try:
                f = open(shard, "rb")
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except (OSError, ValueError) as e:
                raise SafetensorsFormatError(f"cannot map {str(shard)!r}: {e}") from e
            expected = self.layout.headers[shard].file_size
            if len(mm) != expected:
                raise SafetensorsFormatError(
                    f"{str(shard)!r} changed size while reading ({expected} -> {len(mm)} bytes)")
            entry = (f, mm)
            self._maps[shard] = entry
        return entry[1]

    def _release(self, mm: mmap.mmap, begin: int, end: int) -> None:
        start = begin - begin % _PAGE
        if end > start and hasattr(mm, "madvise"):
            mm.madvise(mmap.MADV_DONTNEED, start, end - start)

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Tensor ``name`` as a fresh CPU tensor (converted to ``dtype`` if given)."""
        info = self.layout.info(name)
        rows = info.shape[0] if info.shape else 1
        return self.read_rows(name, 0, rows, dtype)

    def read_rows(self, name: str, start: int, stop: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Rows ``start:stop`` (along the first dimension) of tensor ``name`` as a fresh CPU tensor.

        Rows are contiguous on disk, so a block of a huge tensor (a 128k-row embedding) is
        read without touching the rest of it.
        """
        with self.stored_rows(name, start, stop) as view:
            return view.to(dtype or view.dtype, copy=True)

    @contextmanager
    def stored_rows(self, name: str, start: int, stop: int | None = None) -> Iterator[torch.Tensor]:
        """Rows ``start:stop`` of tensor ``name`` (all rows when ``stop`` is None) as a read-only view of the
        memory map, in the stored dtype; its pages are released when the block ends.

        The view must only be copied from, and not kept: the worker stages or converts it (``execution.staging``).
        """
        info = self.layout.info(name)
        mm = self._map(self.layout.shard_of[name])
        torch_dtype = DTYPES[info.dtype].torch_dtype
        if torch_dtype is None:
            raise SafetensorsFormatError(f"tensor {name!r} has dtype {info.dtype}, which torch cannot represent")
        if stop is None:
            stop = info.shape[0] if info.shape else 1
        shape = (stop - start, *info.shape[1:]) if info.shape else ()
        row_numel = info.numel // info.shape[0] if info.shape and info.shape[0] else 1
        count = (stop - start) * row_numel if info.shape else info.numel
        if count == 0:
            yield torch.empty(shape, dtype=torch_dtype)
            return
        begin = info.begin + start * row_numel * torch_dtype.itemsize
        with warnings.catch_warnings():
            # frombuffer warns that the map is read-only; the view is only ever copied from.
            warnings.simplefilter("ignore", UserWarning)
            view = torch.frombuffer(mm, dtype=torch_dtype, count=count, offset=begin)
        try:
            yield view.reshape(shape)
        finally:
            del view
            self._release(mm, begin, begin + count * torch_dtype.itemsize)

    def prefetch(self, name: str) -> None:
        """Ask the kernel to read tensor ``name`` ahead (``MADV_WILLNEED``): no memory of ours is used."""
        info = self.layout.info(name)
        mm = self._map(self.layout.shard_of[name])
        start = info.begin - info.begin % _PAGE
        if info.end > start and hasattr(mmap, "MADV_WILLNEED"):
            mm.madvise(mmap.MADV_WILLNEED, start, info.end - start)

    def byte_ranges(self, name: str, chunk: int = COPY_CHUNK_BYTES) -> list[tuple[int, int]]:
        """Absolute byte ranges covering tensor ``name`` in chunks (maps its shard now)."""
        info = self.layout.info(name)
        self._map(self.layout.shard_of[name])
        return [(start, min(start + chunk, info.end)) for start in range(info.begin, info.end, chunk)]

    def copy_range(self, name: str, start: int, stop: int, sink: Callable[[str, memoryview], None]) -> None:
        """Pass bytes ``start:stop`` of the shard holding ``name`` to ``sink(name, bytes)``, then release them.

        The shard must already be mapped (``byte_ranges``), so this is safe on another thread.
        """
        mm = self._maps[self.layout.shard_of[name]][1]
        with memoryview(mm) as whole, whole[start:stop] as part:
            sink(name, part)
        self._release(mm, start, stop)
