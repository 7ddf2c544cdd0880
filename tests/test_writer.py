"""The streaming writer: byte-identical to safetensors.save_file, golden header bytes, atomic commit."""

from __future__ import annotations

import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from streammerge.errors import OutputError
from streammerge.io.header import read_header
from streammerge.io.writer import ShardWriter, index_bytes, layout_shard, save_tensors

MIXED = {
    "b.weight": torch.arange(15, dtype=torch.float32).reshape(3, 5).to(torch.bfloat16),
    "a.weight": torch.linspace(-1, 1, 7),
    "c.ids": torch.arange(6).reshape(2, 3),
    "i8": torch.ones(3, dtype=torch.int8),
    "h": torch.arange(4, dtype=torch.float16).reshape(2, 2),
    "empty": torch.zeros(0, 4),
    "flags": torch.tensor([True, False]),
    "d": torch.arange(3, dtype=torch.float64),
}


def test_bytes_equal_safetensors_save_file(tmp_path):
    save_file(MIXED, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
    save_tensors(tmp_path / "ours.safetensors", MIXED)
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


def test_golden_header_bytes():
    layout = layout_shard([("w", "F32", (2, 2)), ("b", "BF16", (3,)), ("n", "I64", (1,))])
    body = (b'{"__metadata__":{"format":"pt"},'
            b'"n":{"dtype":"I64","shape":[1],"data_offsets":[0,8]},'
            b'"w":{"dtype":"F32","shape":[2,2],"data_offsets":[8,24]},'
            b'"b":{"dtype":"BF16","shape":[3],"data_offsets":[24,30]}}')
    body += b" " * (-len(body) % 8)
    assert layout.header == struct.pack("<Q", len(body)) + body
    assert [s.name for s in layout.slots] == ["n", "w", "b"]
    assert layout.file_size == len(layout.header) + 30


def test_written_file_reads_back_with_safetensors_and_our_parser(tmp_path):
    path = tmp_path / "x.safetensors"
    digest = save_tensors(path, MIXED)
    loaded = load_file(str(path))
    for name, tensor in MIXED.items():
        assert torch.equal(loaded[name], tensor), name
    header = read_header(path)
    assert header.metadata == {"format": "pt"}
    assert set(header.tensors) == set(MIXED)
    import hashlib
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()


def test_chunked_writes_and_partial_file_until_commit(tmp_path):
    t = torch.randn(64, 32)
    layout = layout_shard([("t", "F32", (64, 32))])
    path = tmp_path / "s.safetensors"
    with ShardWriter(path, layout) as writer:
        raw = memoryview(t.view(torch.uint8).numpy()).cast("B")
        writer.write_bytes("t", raw[:1000])
        assert not path.exists() and (tmp_path / "s.safetensors.partial").exists()
        writer.write_bytes("t", raw[1000:])
        writer.commit()
    assert path.exists() and not (tmp_path / "s.safetensors.partial").exists()
    assert torch.equal(load_file(str(path))["t"], t)


def test_abandoned_writer_leaves_nothing(tmp_path):
    layout = layout_shard([("a", "F32", (2,)), ("b", "F32", (2,))])
    path = tmp_path / "s.safetensors"
    with pytest.raises(OutputError, match="missing tensor 'b'"):
        with ShardWriter(path, layout) as writer:
            writer.write_tensor("a", torch.zeros(2))
            writer.commit()
    assert list(tmp_path.iterdir()) == []


def test_out_of_order_and_wrong_shape_are_refused(tmp_path):
    layout = layout_shard([("a", "F32", (2,)), ("b", "F32", (2,))])
    with ShardWriter(tmp_path / "s.safetensors", layout) as writer:
        with pytest.raises(OutputError, match="got tensor 'b', expected 'a'"):
            writer.write_tensor("b", torch.zeros(2))
        with pytest.raises(OutputError, match=r"the header promised F32 \(2,\)"):
            writer.write_tensor("a", torch.zeros(3))


def test_index_format_matches_transformers():
    text = index_bytes({"b": "model-00002-of-00002.safetensors", "a": "model-00001-of-00002.safetensors"}, 42)
    assert text.decode() == (
        '{\n  "metadata": {\n    "total_size": 42\n  },\n  "weight_map": {\n'
        '    "a": "model-00001-of-00002.safetensors",\n    "b": "model-00002-of-00002.safetensors"\n  }\n}\n')
