"""Parse and validate safetensors headers without touching tensor data.

Format: 8 bytes little-endian header length N, N bytes of JSON (an object mapping tensor
names to ``{"dtype", "shape", "data_offsets"}`` plus an optional ``"__metadata__"`` map of
strings), then the data buffer.  Offsets are relative to the start of the data buffer.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
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
        # O_NONBLOCK: opening a FIFO planted in a model directory must not hang.
        with os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise _fail(path, "it is not a regular file")
            file_size = st.st_size
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


class _DuplicateKey(Exception):
    pass


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    # json keeps the last of repeated keys; a file that names a tensor twice is ambiguous.
    doc: dict[str, object] = {}
    for key, value in pairs:
        if key in doc:
            raise _DuplicateKey(key[:200])
        doc[key] = value
    return doc


def parse_header_bytes(path: Path, raw: bytes, file_size: int) -> SafetensorsHeader:
    """Validate header JSON ``raw`` of a file of ``file_size`` bytes (see ``read_header``)."""
    try:
        doc = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except _DuplicateKey as e:
        raise _fail(path, f"the header names {e.args[0]!r} twice") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        # ValueError: bad JSON, or an integer beyond Python's digit limit; RecursionError: absurd nesting.
        raise _fail(path, f"the header is not valid UTF-8 JSON ({str(e)[:200]})") from None
    if not isinstance(doc, dict):
        raise _fail(path, f"the header must be a JSON object, found {type(doc).__name__}")
    data_start = 8 + len(raw)
    data_size = file_size - data_start

    metadata = doc.pop(METADATA_KEY, None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise _fail(path, f"{METADATA_KEY!r} must map strings to strings, found {metadata!r:.200}")

    tensors: dict[str, TensorInfo] = {}
    for name, entry in doc.items():
        tensors[name] = _parse_entry(path, name, entry, data_start, data_size)

    spans = sorted((t.begin, t.end, t.name) for t in tensors.values() if t.end > t.begin)
    for (b0, e0, n0), (b1, _e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise _fail(path, f"tensors {n0!r:.200} and {n1!r:.200} overlap (bytes {b0}..{e0} and {b1}..)")
    ordered = dict(sorted(tensors.items(), key=lambda kv: (kv[1].begin, kv[0])))
    return SafetensorsHeader(
        path=path, tensors=ordered, metadata=dict(metadata), data_start=data_start,
        file_size=file_size, header_sha256=hashlib.sha256(raw).hexdigest())


def _parse_entry(path: Path, name: str, entry: object, data_start: int, data_size: int) -> TensorInfo:
    label = name if len(name) <= 200 else name[:200] + "…"  # for messages: a header may be 100 MB
    if not isinstance(entry, dict):
        raise _fail(path, f"tensor {label!r}: entry must be an object, found {entry!r:.200}")
    dtype = entry.get("dtype")
    shape = entry.get("shape")
    offsets = entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise _fail(path, f"tensor {label!r}: unknown dtype {dtype!r:.100}; known: {', '.join(DTYPES)}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise _fail(path, f"tensor {label!r}: shape must be a list of non-negative integers, found {shape!r:.200}")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(type(o) is int and o >= 0 for o in offsets)):
        raise _fail(path, f"tensor {label!r}: data_offsets must be two non-negative integers, found {offsets!r:.200}")
    begin, end = offsets
    if end < begin:
        raise _fail(path, f"tensor {label!r}: data_offsets {offsets} end before they begin")
    if end > data_size:
        raise _fail(path, f"tensor {label!r}: data_offsets {offsets} run past the data buffer "
                          f"({data_size} bytes); the file is truncated")
    expected = _bounded_byte_size(dtype, shape, end - begin)
    if end - begin != expected:
        needs = f"{expected} bytes" if expected is not None else f"more than {end - begin} bytes"
        raise _fail(path, f"tensor {label!r}: {dtype} shape {shape!r:.200} needs {needs} "
                          f"but data_offsets {offsets} span {end - begin}")
    return TensorInfo(name=name, dtype=dtype, shape=tuple(shape), begin=data_start + begin, end=data_start + end)


def _bounded_byte_size(dtype: str, shape: list[int], limit: int) -> int | None:
    """``byte_size``, or None as soon as it exceeds ``limit`` (a hostile shape of huge
    dimensions would otherwise cost a quadratic big-integer product)."""
    if 0 in shape:
        return 0
    bits = DTYPES[dtype].bits
    numel = 1
    for dim in shape:
        numel *= dim
        if numel * bits > 8 * limit + 7:
            return None
    return byte_size(dtype, shape)
