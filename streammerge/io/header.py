"""Parse and validate safetensors headers without touching tensor data.

Format: 8 bytes little-endian header length N, N bytes of JSON (an object mapping tensor
names to ``{"dtype", "shape", "data_offsets"}`` plus an optional ``"__metadata__"`` map of
strings), then the data buffer.  Offsets are relative to the start of the data buffer.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from ..errors import SafetensorsFormatError
from ..names import METADATA_KEY
from .dtypes import DTYPES, byte_size

# A header larger than this is refused before it is read (safetensors' own limit is 100 MB).
MAX_HEADER_BYTES = 100_000_000


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives.

    Attributes:
        name: tensor name.
        dtype: safetensors dtype string.
        shape: tensor shape.
        begin: absolute byte offset of the tensor data in the file.
        end: absolute end offset (exclusive).
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        n = 1
        for dim in self.shape:
            n *= dim
        return n


@dataclass(frozen=True)
class SafetensorsHeader:
    """A validated header: tensors in file order, metadata, and sizes."""

    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int
    file_size: int
    header_sha256: str


def _fail(path: Path, reason: str) -> SafetensorsFormatError:
    return SafetensorsFormatError(f"{str(path)!r} is not a valid safetensors file: {reason}")


def read_header(path: str | os.PathLike[str]) -> SafetensorsHeader:
    """Read and validate the header of a safetensors file.

    Checks: the length prefix fits in the file, the JSON parses to an object, every entry
    has a known dtype, a non-negative integer shape and offsets whose span equals the
    shape's byte size, offsets lie inside the data buffer, and no two tensors overlap.

    Raises:
        SafetensorsFormatError: naming the file, the tensor and the reason.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            file_size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise _fail(path, f"the file is {file_size} bytes, too short for the 8-byte header length")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES:
                raise _fail(path, f"the header length {header_len} exceeds the {MAX_HEADER_BYTES}-byte limit")
            if 8 + header_len > file_size:
                raise _fail(
                    path, f"the header length {header_len} runs past the end of the file ({file_size} bytes); "
                    "the file is truncated or not safetensors")
            raw = f.read(header_len)
    except OSError as e:
        raise SafetensorsFormatError(f"cannot read {str(path)!r}: {e.strerror or e}") from e
    return parse_header_bytes(path, raw, file_size)


def parse_header_bytes(path: Path, raw: bytes, file_size: int) -> SafetensorsHeader:
    """Validate header JSON ``raw`` of a file of ``file_size`` bytes (see ``read_header``)."""
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _fail(path, f"the header is not valid UTF-8 JSON ({e})") from e
    if not isinstance(doc, dict):
        raise _fail(path, f"the header must be a JSON object, found {type(doc).__name__}")
    data_start = 8 + len(raw)
    data_size = file_size - data_start

    metadata = doc.pop(METADATA_KEY, None) or {}
    if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise _fail(path, f"{METADATA_KEY!r} must map strings to strings, found {metadata!r:.200}")

    tensors: dict[str, TensorInfo] = {}
    for name, entry in doc.items():
        tensors[name] = _parse_entry(path, name, entry, data_start, data_size)

    spans = sorted((t.begin, t.end, t.name) for t in tensors.values() if t.end > t.begin)
    for (b0, e0, n0), (b1, _e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise _fail(path, f"tensors {n0!r} and {n1!r} overlap (bytes {b0}..{e0} and {b1}..)")
    ordered = dict(sorted(tensors.items(), key=lambda kv: (kv[1].begin, kv[0])))
    return SafetensorsHeader(
        path=path, tensors=ordered, metadata=dict(metadata), data_start=data_start,
        file_size=file_size, header_sha256=hashlib.sha256(raw).hexdigest())


def _parse_entry(path: Path, name: str, entry: object, data_start: int, data_size: int) -> TensorInfo:
    if not isinstance(entry, dict):
        raise _fail(path, f"tensor {name!r}: entry must be an object, found {entry!r:.200}")
    dtype = entry.get("dtype")
    shape = entry.get("shape")
    offsets = entry.get("data_offsets")
    if dtype not in DTYPES:
        raise _fail(path, f"tensor {name!r}: unknown dtype {dtype!r}; known: {', '.join(DTYPES)}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise _fail(path, f"tensor {name!r}: shape must be a list of non-negative integers, found {shape!r:.200}")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(type(o) is int and o >= 0 for o in offsets)):
        raise _fail(path, f"tensor {name!r}: data_offsets must be two non-negative integers, found {offsets!r:.200}")
    begin, end = offsets
    if end < begin:
        raise _fail(path, f"tensor {name!r}: data_offsets {offsets} end before they begin")
    if end > data_size:
        raise _fail(path, f"tensor {name!r}: data_offsets {offsets} run past the data buffer "
                          f"({data_size} bytes); the file is truncated")
    expected = byte_size(dtype, shape)
    if end - begin != expected:
        raise _fail(path, f"tensor {name!r}: {dtype} shape {shape} needs {expected} bytes "
                          f"but data_offsets {offsets} span {end - begin}")
    return TensorInfo(name=name, dtype=dtype, shape=tuple(shape), begin=data_start + begin, end=data_start + end)
