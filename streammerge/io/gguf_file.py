"""A streaming GGUF writer: header, metadata and tensor infos first, then tensor data in order.

gguf-py's ``GGUFWriter`` packs the header, the key/value metadata and the tensor infos (it
computes every offset from the declared byte sizes, aligned to ``general.alignment``, 32 by
default); the tensor data then follows one tensor — or one row block — at a time at those
aligned offsets, so a file is never held in memory.  As with ``writer.ShardWriter``, a file is
written to ``<name>.partial``, fsynced, and renamed only when every byte is in; ``commit``
returns its size and SHA-256.  Split files follow llama.cpp's layout
(``model-00001-of-00003.gguf``; ``split.no``, ``split.count``, ``split.tensors.count``; the
metadata in the first file only).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import torch

from ..errors import InputError, OutputError
from ..jobs.faults import kill_point
from .atomic import fsync_dir, partial_path, write_error

SPLIT_NAME_TEMPLATE = "{stem}-{index:05d}-of-{count:05d}.gguf"
ALIGNMENT_KEY = "general.alignment"
DEFAULT_ALIGNMENT = 32
HASH_CHUNK = 8 << 20


def gguf_module() -> Any:
    """The gguf-py package, or a typed error naming the install command."""
    try:
        import gguf
    except ImportError as e:
        raise InputError("GGUF files need the `gguf` package (gguf-py); pip install gguf==0.19.0") from e
    return gguf


@dataclass(frozen=True)
class TensorEntry:
    """A tensor's info record: GGUF name, shape in row-major (HF) order, GGML type name, data bytes."""

    name: str
    shape: tuple[int, ...]
    ggml_type: str
    nbytes: int


def split_paths(path: Path, count: int) -> list[Path]:
    """The file names of a model split ``count`` ways (just ``path`` when ``count`` is 1)."""
    if count == 1:
        return [path]
    return [path.with_name(SPLIT_NAME_TEMPLATE.format(stem=path.stem, index=i + 1, count=count))
            for i in range(count)]


def encode_rows(rows: torch.Tensor, ggml_type: str) -> bytes:
    """GGUF bytes of a block of whole rows, exactly as gguf-py's ``quants.quantize`` writes them."""
    gguf = gguf_module()
    data = rows.detach().to(torch.float32).contiguous().numpy() if rows.dtype != torch.float16 \
        else rows.detach().contiguous().numpy()
    return gguf.quants.quantize(data, gguf.GGMLQuantizationType[ggml_type]).tobytes()


def permute_rows(rows: Any, n_head: int) -> Any:
    """The converter's Q/K permutation of whole heads: ``(h, 2, d/2, …) → (h, d/2, 2, …)``."""
    shape = rows.shape
    return rows.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def unpermute_rows(rows: Any, n_head: int) -> Any:
    """The inverse of ``permute_rows``."""
    shape = rows.shape
    return rows.reshape(n_head, shape[0] // n_head // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9
SPLIT_KEYS = (("split.no", 2), ("split.count", 2), ("split.tensors.count", 4))


def _value_bytes(value: Any, vtype: int, sub_type: int | None) -> int:
    if vtype in _SCALAR_BYTES:
        return _SCALAR_BYTES[vtype]
    if vtype == _STRING:
        return 8 + len(value.encode("utf-8") if isinstance(value, str) else value)
    assert vtype == _ARRAY and sub_type is not None
    return 12 + sum(_value_bytes(v, sub_type, None) for v in value)


def alignment_of(metadata: Sequence[tuple[str, Any, int, int | None]]) -> int:
    """The data alignment: ``general.alignment`` when the metadata sets it, else GGUF's default 32."""
    return int(next((v for k, v, *_ in metadata if k == ALIGNMENT_KEY), DEFAULT_ALIGNMENT))


def file_size(metadata: Sequence[tuple[str, Any, int, int | None]], tensors: Sequence[TensorEntry],
              split: bool = False) -> int:
    """The exact size of the GGUF file ``GGUFFileWriter`` writes for this metadata and these tensors."""
    alignment = alignment_of(metadata)
    size = 24  # magic, version, tensor count, kv count
    size += sum(8 + len(k.encode()) + 4 + _value_bytes(v, t, sub) for k, v, t, sub in metadata)
    if split:
        size += sum(8 + len(k) + 4 + n for k, n in SPLIT_KEYS)
    size += sum(8 + len(t.name.encode()) + 4 + 8 * len(t.shape) + 4 + 8 for t in tensors)
    size += -size % alignment
    return size + sum(t.nbytes + (-t.nbytes % alignment) for t in tensors)


class GGUFFileWriter:
    """Writes one GGUF file (or one split) in tensor-info order; use as a context manager.

    ``write_bytes(name, data)`` must follow the order of ``tensors``; a tensor may come in
    several chunks.  ``commit`` checks completeness, fsyncs, renames and returns ``(size, sha256)``.
    """

    def __init__(self, path: Path, arch: str, metadata: Iterable[tuple[str, Any, int, int | None]],
                 tensors: Sequence[TensorEntry], split: tuple[int, int, int] | None = None) -> None:
        """``metadata``: ``(key, value, GGUFValueType, sub_type)``; ``split``: ``(no, count, total tensors)``."""
        gguf = gguf_module()
        self.path = Path(path)
        self.tensors = list(tensors)
        self._tmp = partial_path(self.path)
        self._committed = False
        metadata = list(metadata)
        writer = gguf.GGUFWriter(None, arch)
        writer.data_alignment = alignment_of(metadata)
        writer.kv_data = [{key: gguf.gguf_writer.GGUFValue(value, gguf.GGUFValueType(vtype),
                                                          None if sub is None else gguf.GGUFValueType(sub))
                           for key, value, vtype, sub in metadata}]
        if split is not None:
            no, count, total = split
            writer.add_uint16(gguf.Keys.Split.LLM_KV_SPLIT_NO, no)
            writer.add_uint16(gguf.Keys.Split.LLM_KV_SPLIT_COUNT, count)
            writer.add_int32(gguf.Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT, total)
        for t in self.tensors:
            writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes,
                                   raw_dtype=gguf.GGMLQuantizationType[t.ggml_type])
        self._alignment = writer.data_alignment
        try:
            writer.write_header_to_file(path=self._tmp)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            self._file = writer.fout[0]
            self._file.flush()
        except OSError as e:
            self._tmp.unlink(missing_ok=True)
            raise write_error(self.path, e) from e
        self._sha = hashlib.sha256()
        with open(self._tmp, "rb") as f:
            while chunk := f.read(HASH_CHUNK):
                self._sha.update(chunk)
        self._index = 0
        self._filled = 0
        self._pad()

    def __enter__(self) -> GGUFFileWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if not self._committed:
            self.abort()

    def _pad(self) -> None:
        pad = -self._file.tell() % self._alignment
        if pad:
            self._put(b"\0" * pad)

    def _put(self, data: bytes | memoryview) -> None:
        try:
            self._file.write(data)
        except OSError as e:
            raise write_error(self._tmp, e) from e
        self._sha.update(data)
        kill_point("bytes", len(data))

    def write_bytes(self, name: str, data: bytes | memoryview) -> None:
        """Write (part of) the data of tensor ``name``, the next one in order."""
        if self._index < len(self.tensors) and self._filled == self.tensors[self._index].nbytes \
                and self.tensors[self._index].name != name:
            self._index, self._filled = self._index + 1, 0
            self._pad()
        if self._index >= len(self.tensors) or self.tensors[self._index].name != name:
            expected = self.tensors[self._index].name if self._index < len(self.tensors) else "nothing"
            raise OutputError(f"internal error writing {str(self.path)!r}: got tensor {name!r}, expected {expected!r}")
        entry = self.tensors[self._index]
        if self._filled + len(data) > entry.nbytes:
            raise OutputError(f"internal error writing {str(self.path)!r}: {self._filled + len(data)} bytes for "
                              f"tensor {name!r}, its info says {entry.nbytes}")
        self._put(data)
        self._filled += len(data)

    def commit(self) -> tuple[int, str]:
        """Finish the file: verify completeness, pad, fsync, rename. Returns ``(size, sha256)``."""
        pending = self._index + (self._filled == self.tensors[self._index].nbytes) if self.tensors else 0
        if pending < len(self.tensors):
            missing = self.tensors[pending].name
            raise OutputError(f"internal error: {str(self.path)!r} is missing data of tensor {missing!r}")
        self._pad()
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
            size = self._file.tell()
            self._file.close()
            os.replace(self._tmp, self.path)
        except OSError as e:
            self.abort()
            raise write_error(self.path, e) from e
        fsync_dir(self.path.parent)
        self._committed = True
        return size, self._sha.hexdigest()

    def abort(self) -> None:
        """Close and delete the partial file."""
        try:
            self._file.close()
        except (OSError, AttributeError):
            pass
        self._tmp.unlink(missing_ok=True)
