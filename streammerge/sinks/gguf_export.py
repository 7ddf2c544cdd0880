"""HF tensors → GGUF files, streaming: what the GGUF sink does with merged tensors.

``RowEncoder`` turns row blocks of one HF tensor (stored orientation, any float dtype) into GGUF
bytes: it applies the layout transform (the Llama Q/K permutation works on whole heads, so it
holds at most one head's rows, ``rows/heads``, of a block that ends mid-head) and encodes to the
tensor's GGML type.  Every other tensor passes through block by block; nothing is held longer.
``write_gguf`` converts a whole HF model directory that way — read one tensor (row blocks of
at most ``block_rows`` rows) at a time with ``io.reader``, write each GGUF file with
``io.gguf_file``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ..io.gguf_file import GGUFFileWriter, TensorEntry, encode_rows, file_size, split_paths
from ..io.reader import CheckpointReader, open_checkpoint
from .gguf_layout import GGUFLayout, GGUFTensor, build_layout, default_gguf_type, permute_rows, split_tensors

DEFAULT_BLOCK_ROWS = 4096


class RowEncoder:
    """Encodes the row blocks of one tensor, in order, to the bytes of its GGUF data."""

    def __init__(self, tensor: GGUFTensor) -> None:
        self.tensor = tensor
        self._pending: torch.Tensor | None = None

    def feed(self, rows: torch.Tensor) -> bytes:
        """The bytes for ``rows`` (the next rows of the tensor) that can be written now."""
        t = self.tensor
        if not t.permute_heads:
            return encode_rows(rows, t.ggml_type)
        if self._pending is not None:
            rows = torch.cat([self._pending, rows])
            self._pending = None
        period = t.row_period
        whole = rows.shape[0] - rows.shape[0] % period
        if whole < rows.shape[0]:
            self._pending = rows[whole:].clone()
        if not whole:
            return b""
        return encode_rows(permute_rows(rows[:whole], whole // period), t.ggml_type)

    def finish(self) -> None:
        """Check that the tensor ended on a head boundary (an internal invariant)."""
        assert self._pending is None, f"{self.tensor.name}: rows left over mid-head"


def generated_bytes(tensor: GGUFTensor) -> bytes:
    """The data of a tensor the layout generates (``rope_freqs``)."""
    assert tensor.values is not None
    return encode_rows(torch.tensor(tensor.values, dtype=torch.float32), tensor.ggml_type)


@dataclass(frozen=True)
class GGUFFilePlan:
    """One output file: its path, its tensors and its split position (None when not split)."""

    path: Path
    tensors: tuple[GGUFTensor, ...]
    split: tuple[int, int, int] | None


def plan_files(layout: GGUFLayout, out_path: Path, max_shard_size: int | None = None) -> list[GGUFFilePlan]:
    """The files a layout is written to: one, or llama.cpp's split layout when ``max_shard_size`` asks."""
    splits = split_tensors(layout.tensors, max_shard_size)
    paths = split_paths(Path(out_path), len(splits))
    total = len(layout.tensors)
    return [GGUFFilePlan(p, tuple(ts), None if len(splits) == 1 else (i, len(splits), total))
            for i, (p, ts) in enumerate(zip(paths, splits))]


def _file_parts(layout: GGUFLayout, plan: GGUFFilePlan) -> tuple[list[tuple], list[TensorEntry]]:
    first = plan.split is None or plan.split[0] == 0
    metadata = [(m.key, m.value, m.type, m.sub_type) for m in layout.metadata] if first else []
    return metadata, [TensorEntry(t.name, t.shape, t.ggml_type, t.nbytes) for t in plan.tensors]


def open_file(layout: GGUFLayout, plan: GGUFFilePlan) -> GGUFFileWriter:
    """A writer for one planned file; metadata goes into the first file only."""
    metadata, entries = _file_parts(layout, plan)
    return GGUFFileWriter(plan.path, layout.arch, metadata, entries, plan.split)


def planned_size(layout: GGUFLayout, plan: GGUFFilePlan) -> int:
    """The exact size of a planned file, before anything is written (the sink's ``OutputUnit.size``)."""
    metadata, entries = _file_parts(layout, plan)
    return file_size(metadata, entries, split=plan.split is not None)


def _row_blocks(reader: CheckpointReader, name: str, block_rows: int) -> Iterator[torch.Tensor]:
    info = reader.layout.info(name)
    if len(info.shape) < 2:
        yield reader.read(name)
        return
    for start in range(0, info.shape[0], block_rows):
        yield reader.read_rows(name, start, min(start + block_rows, info.shape[0]))


def write_gguf(hf_dir: str | Path, out_path: str | Path, gguf_type: str | None = None,
               max_shard_size: int | None = None, block_rows: int = DEFAULT_BLOCK_ROWS) -> list[tuple[Path, int, str]]:
    """Convert an HF model directory to GGUF as llama.cpp's converter would, one row block at a time.

    Args:
        hf_dir: model directory (config.json, tokenizer.json, safetensors).
        out_path: the ``.gguf`` file; split names are derived from it.
        gguf_type: f32, f16, bf16 or q8_0 (default: bf16 for a BF16 model, else f16).
        max_shard_size: split into files of at most this many tensor bytes.
        block_rows: rows read and encoded at a time.

    Returns:
        ``(path, size, sha256)`` of every file written.
    """
    checkpoint = open_checkpoint(hf_dir)
    order = [n for shard in sorted(checkpoint.shards, key=lambda p: p.name)
             for n in checkpoint.headers[shard].tensors]
    infos = [(n, checkpoint.info(n).dtype, tuple(checkpoint.info(n).shape)) for n in order]
    if gguf_type is None:
        gguf_type = default_gguf_type(d for _, d, s in infos if len(s) >= 2)
    layout = build_layout(hf_dir, infos, gguf_type)
    written = []
    with CheckpointReader(checkpoint) as reader:
        for plan in plan_files(layout, Path(out_path), max_shard_size):
            with open_file(layout, plan) as writer:
                for tensor in plan.tensors:
                    if tensor.hf_name is None:
                        writer.write_bytes(tensor.name, generated_bytes(tensor))
                        continue
                    encoder = RowEncoder(tensor)
                    for rows in _row_blocks(reader, tensor.hf_name, block_rows):
                        writer.write_bytes(tensor.name, encoder.feed(rows))
                    encoder.finish()
                size, sha = writer.commit()
            assert size == planned_size(layout, plan), plan.path
            written.append((plan.path, size, sha))
    return written
