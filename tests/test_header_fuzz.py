"""Fuzzing the safetensors reader: whatever a header says, reading a file either works within the
file's bounds or raises ``SafetensorsFormatError`` — never another exception, a hang or a huge
allocation.

Four generators: from a valid file with several dtypes (including sub-byte F4, a scalar and an
empty tensor), flipped and overwritten header bytes plus truncation, header JSON with fields
replaced by arbitrary JSON, and arbitrary length prefixes; and headers built to be plausible
(known dtypes, small shapes, offsets in, near, across and between the data) over random bytes.
When a mutant is accepted, every tensor must lie inside the file and read back with its
declared shape.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streammerge.errors import SafetensorsFormatError
from streammerge.io.dtypes import DTYPES, byte_size
from streammerge.io.header import read_header
from streammerge.io.reader import CheckpointReader, open_checkpoint
from streammerge.io.writer import save_tensors

FUZZ = settings(max_examples=150, deadline=2000, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def valid(tmp_path_factory) -> tuple[Path, bytes]:
    root = tmp_path_factory.mktemp("fuzz")
    path = root / "valid.safetensors"
    save_tensors(path, {
        "w": torch.arange(12, dtype=torch.float32).reshape(3, 4),
        "b": torch.ones(5, dtype=torch.bfloat16),
        "ids": torch.arange(4),
        "flags": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5, dtype=torch.float16),
        "empty": torch.zeros(0, 3),
    })
    data = bytearray(path.read_bytes())
    # A sub-byte tensor torch cannot represent: append F4 [2, 3] (3 bytes) by hand.
    (n,) = struct.unpack("<Q", data[:8])
    doc = json.loads(data[8:8 + n])
    end = max(e["data_offsets"][1] for k, e in doc.items() if k != "__metadata__")
    doc["f4"] = {"dtype": "F4", "shape": [2, 3], "data_offsets": [end, end + 3]}
    raw = json.dumps(doc).encode()
    raw += b" " * (-len(raw) % 8)
    return root, struct.pack("<Q", len(raw)) + raw + bytes(data[8 + n:]) + b"\x12\x34\x56"


def check_reader(path: Path) -> None:
    """Read everything the way the engine does; only our typed error may escape."""
    try:
        header = read_header(path)
        size = path.stat().st_size
        for info in header.tensors.values():
            assert header.data_start <= info.begin <= info.end <= size
            assert info.nbytes == byte_size(info.dtype, info.shape)
        layout = open_checkpoint(path)
        with CheckpointReader(layout) as reader:
            for name, info in header.tensors.items():
                copied = []
                for start, stop in reader.byte_ranges(name):
                    reader.copy_range(name, start, stop, lambda _n, part: copied.append(len(part)))
                assert sum(copied) == info.nbytes
                if DTYPES[info.dtype].torch_dtype is None:
                    with pytest.raises(SafetensorsFormatError):
                        reader.read(name)
                    continue
                assert tuple(reader.read(name).shape) == info.shape
    except SafetensorsFormatError:
        pass


def _write(root: Path, data: bytes) -> Path:
    path = root / "model.safetensors"
    path.write_bytes(data)
    return path


def test_the_valid_file_reads(valid):
    root, data = valid
    path = _write(root, data)
    check_reader(path)
    assert len(read_header(path).tensors) == 7


@FUZZ
@given(edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=8),
       cut=st.one_of(st.none(), st.integers(0, 10**6)))
def test_byte_mutations(valid, edits, cut):
    root, data = valid
    (n,) = struct.unpack("<Q", data[:8])
    mutant = bytearray(data)
    for position, value in edits:
        mutant[position % (8 + n)] = value  # the prefix and the header JSON
    if cut is not None:
        mutant = mutant[:cut % (len(mutant) + 1)]
    check_reader(_write(root, bytes(mutant)))


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12)
FIELDS = st.sampled_from(["dtype", "shape", "data_offsets", None])
TENSORS = st.sampled_from(["w", "b", "ids", "flags", "scalar", "empty", "f4", "__metadata__", "new"])


@FUZZ
@given(changes=st.lists(st.tuples(TENSORS, FIELDS, JSON), min_size=1, max_size=4),
       interesting=st.lists(st.tuples(TENSORS, st.sampled_from(["shape", "data_offsets"]),
                                      st.lists(st.integers(-3, 2**64), max_size=4)), max_size=2))
def test_json_mutations(valid, changes, interesting):
    root, data = valid
    (n,) = struct.unpack("<Q", data[:8])
    doc = json.loads(data[8:8 + n])
    for tensor, field, value in [*changes, *interesting]:
        if field is None or not isinstance(doc.get(tensor), dict):
            doc[tensor] = value
        else:
            doc[tensor][field] = value
    raw = json.dumps(doc).encode()
    raw += b" " * (-len(raw) % 8)
    check_reader(_write(root, struct.pack("<Q", len(raw)) + raw + data[8 + n:]))


@st.composite
def plausible_files(draw) -> bytes:
    """Headers a reader is likely to accept: known dtypes, small shapes, offsets in or near the data
    (unaligned, overlapping, gapped), over random data bytes."""
    data = draw(st.binary(max_size=256))
    doc: dict[str, object] = {}
    if draw(st.booleans()):
        doc["__metadata__"] = draw(st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=2))
    for i in range(draw(st.integers(0, 4))):
        dtype = draw(st.sampled_from(sorted(DTYPES)))
        shape = draw(st.lists(st.integers(0, 6), max_size=3))
        begin = draw(st.integers(0, len(data) + 2))
        end = begin + byte_size(dtype, shape) + draw(st.sampled_from([0, 0, 0, 1, -1]))
        doc[f"t{i}"] = {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}
    raw = json.dumps(doc).encode()
    raw += b" " * draw(st.sampled_from([-len(raw) % 8, 0, 3]))
    return struct.pack("<Q", len(raw)) + raw + data


@FUZZ
@given(data=plausible_files())
def test_plausible_headers(valid, data):
    root, _ = valid
    check_reader(_write(root, data))


@FUZZ
@given(length=st.one_of(st.integers(0, 2**64 - 1), st.integers(0, 2048)))
def test_length_prefixes(valid, length):
    root, data = valid
    check_reader(_write(root, struct.pack("<Q", length) + data[8:]))


def test_huge_claims_cost_nothing(valid):
    """Shapes and offsets of astronomical size are refused by arithmetic, not by allocating."""
    root, data = valid
    for entry in [{"dtype": "F32", "shape": [2**63] * 20000, "data_offsets": [0, 4]},
                  {"dtype": "F32", "shape": [1], "data_offsets": [0, 2**200]},
                  {"dtype": "F32", "shape": [1] * 200000, "data_offsets": [0, 4]}]:
        raw = json.dumps({"x": entry}).encode()
        path = _write(root, struct.pack("<Q", len(raw)) + raw + b"\0" * 4)
        check_reader(path)
    deep = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(SafetensorsFormatError, match="not valid UTF-8 JSON"):
        read_header(_write(root, struct.pack("<Q", len(deep)) + deep))
