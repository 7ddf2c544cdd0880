"""Reading a GGUF file's header fast: metadata values, tensor infos, and tensor data as memory-mapped views.

gguf-py's ``GGUFReader`` keeps a numpy view per element of every metadata array, which takes
seconds for a tokenizer of 50k–150k tokens and merges; a merge opens its base several times.
This reader walks the same GGUF v2/v3 layout (little-endian) with ``struct``: numeric arrays are
one ``numpy.frombuffer`` each, strings are decoded once.  It offers the part of ``GGUFReader``'s
interface the GGUF base uses: ``fields[key].contents()`` / ``.types``, ``tensors`` (name, type,
shape in GGUF order, byte size, absolute data offset, ``data`` as a view of the map: float32 /
float16 arrays for F32 / F16, rows of bytes otherwise) and ``data_offset``.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from .gguf_file import ALIGNMENT_KEY, DEFAULT_ALIGNMENT, gguf_module

__all__ = ["GGUFFileReader", "GGUFField", "GGUFTensorInfo"]

GGUF_MAGIC = b"GGUF"
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
          7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class GGUFField:
    """One metadata key: its value and GGUF value types (``[ARRAY, element type]`` for an array)."""

    name: str
    value: Any
    types: list[Any]

    def contents(self) -> Any:
        return self.value


@dataclass(frozen=True)
class GGUFTensorInfo:
    """One tensor: as gguf-py's ``ReaderTensor`` names it."""

    name: str
    tensor_type: Any
    shape: np.ndarray
    n_bytes: int
    data_offset: int
    data: np.ndarray


class GGUFFileReader:
    """The header of one GGUF file, and its tensors as views of a read-only memory map."""

    def __init__(self, path: str | Path) -> None:
        gguf = gguf_module()
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as e:
            raise InputError(f"cannot read GGUF file {str(self.path)!r}: {e}") from e
        self._buf = memoryview(self._map)
        try:
            self._parse(gguf)
        except (struct.error, IndexError, UnicodeDecodeError, ValueError, KeyError) as e:
            raise InputError(f"{str(self.path)!r} is not a valid GGUF file: {type(e).__name__}: {e}") from e

    def _parse(self, gguf: Any) -> None:
        buf = self._buf
        magic, version = bytes(buf[:4]), struct.unpack_from("<I", buf, 4)[0]
        if magic != GGUF_MAGIC or version not in (2, 3):
            raise ValueError(f"magic {magic!r} version {version}; expected GGUF version 2 or 3 (little-endian)")
        n_tensors, n_kv = struct.unpack_from("<QQ", buf, 8)
        pos = 24
        self.fields: dict[str, GGUFField] = {}
        for _ in range(n_kv):
            key, pos = self._string(pos)
            (vtype,) = struct.unpack_from("<I", buf, pos)
            value, types, pos = self._value(pos + 4, vtype, gguf)
            self.fields[key] = GGUFField(key, value, types)
        infos = []
        for _ in range(n_tensors):
            name, pos = self._string(pos)
            (ndim,) = struct.unpack_from("<I", buf, pos)
            dims = struct.unpack_from(f"<{ndim}Q", buf, pos + 4)
            ttype, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * ndim)
            pos += 4 + 8 * ndim + 12
            infos.append((name, dims, gguf.GGMLQuantizationType(ttype), offset))
        field = self.fields.get(ALIGNMENT_KEY)
        alignment = int(field.value) if field is not None else DEFAULT_ALIGNMENT
        self.data_offset = pos + (-pos % alignment)
        self.tensors = [self._tensor(gguf, *info) for info in infos]

    def _tensor(self, gguf: Any, name: str, dims: tuple[int, ...], qtype: Any, offset: int) -> GGUFTensorInfo:
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        count = int(np.prod(dims, dtype=np.int64))
        n_bytes = count // block * size
        start = self.data_offset + offset
        if start + n_bytes > len(self._map):
            raise ValueError(f"tensor {name!r} runs past the end of the file")
        shape = tuple(reversed(dims))
        if qtype.name in ("F32", "F16"):
            data = np.frombuffer(self._map, np.float32 if qtype.name == "F32" else np.float16, count, start)
            data = data.reshape(shape)
        else:
            data = np.frombuffer(self._map, np.uint8, n_bytes, start).reshape(*shape[:-1], shape[-1] // block * size)
        return GGUFTensorInfo(name, qtype, np.array(dims, dtype=np.uint64), n_bytes, start, data)

    def _string(self, pos: int) -> tuple[str, int]:
        (length,) = struct.unpack_from("<Q", self._buf, pos)
        return str(self._buf[pos + 8:pos + 8 + length], "utf-8"), pos + 8 + length

    def _value(self, pos: int, vtype: int, gguf: Any) -> tuple[Any, list[Any], int]:
        kind = gguf.GGUFValueType(vtype)
        if vtype in _SCALARS:
            fmt = _SCALARS[vtype]
            return struct.unpack_from(fmt, self._buf, pos)[0], [kind], pos + struct.calcsize(fmt)
        if vtype == _STRING:
            value, pos = self._string(pos)
            return value, [kind], pos
        if vtype != _ARRAY:
            raise ValueError(f"unknown metadata value type {vtype}")
        etype, count = struct.unpack_from("<IQ", self._buf, pos)
        pos += 12
        if etype in _NUMPY:
            dtype = np.dtype(_NUMPY[etype]).newbyteorder("<")
            values = np.frombuffer(self._map, dtype, count, pos)
            return values.tolist(), [kind, gguf.GGUFValueType(etype)], pos + values.nbytes
        items, sub = [], [gguf.GGUFValueType(etype)]
        for _ in range(count):
            item, sub, pos = self._value(pos, etype, gguf)
            items.append(item)
        return items, [kind, *sub], pos
