"""A GGUF base as a checkpoint: the planner's layout and the worker's reader, under HF tensor names.

``open_gguf_checkpoint`` turns a GGUF model (one file, a llama.cpp split set, or a directory
holding one of them) into a ``CheckpointLayout`` like a safetensors model's: every tensor under
its HF name and HF shape, its stored GGML type as the dtype (``GGUF_Q8_0``, ``GGUF_F16`` …, so a
plan never mistakes GGUF bytes for safetensors bytes), and the absolute byte range of its data
in its file.  ``GGUFCheckpointReader`` reads rows of such a tensor dequantized to float32 in HF
orientation (the converter's Llama Q/K permutation undone); its byte ranges are the stored
bytes, which a GGUF output copies unchanged.  Quantization blocks run along a row, so any range
of rows dequantizes on its own; permuted Q/K rows are read in whole heads and cut.
"""

from __future__ import annotations

import hashlib
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError
from ..io.gguf_file import gguf_module, unpermute_rows
from ..io.header import SafetensorsHeader, TensorInfo
from ..io.reader import CheckpointLayout, CheckpointReader
from .gguf_base import SPLIT_PATTERN, GGUFBase

__all__ = ["GGUF_SUFFIX", "GGUF_DTYPE_PREFIX", "GGUFCheckpoint", "GGUFCheckpointReader", "find_gguf",
           "open_gguf_checkpoint", "ggml_type_of"]

GGUF_SUFFIX = ".gguf"
GGUF_DTYPE_PREFIX = "GGUF_"
# GGUF tensors no HF checkpoint stores: llama.cpp's converter generates them from config.json.
GENERATED_TENSORS = frozenset({"rope_freqs.weight"})
# Header bytes hashed into the base fingerprint (metadata and tensor infos of a large vocabulary fit).
FINGERPRINT_BYTES = 16 << 20


def _dequantized_types() -> frozenset[str]:
    gguf = gguf_module()
    return frozenset({"F32", "F16", *(t.name for t in gguf.quants._type_traits)})


def ggml_type_of(dtype: str) -> str | None:
    """``GGUF_Q8_0`` → ``Q8_0``; None for a safetensors dtype."""
    return dtype[len(GGUF_DTYPE_PREFIX):] if dtype.startswith(GGUF_DTYPE_PREFIX) else None


def find_gguf(path: Path) -> Path | None:
    """The GGUF file ``path`` names: itself, or the only GGUF model (or first split) in a directory."""
    if path.is_file():
        return path if path.suffix == GGUF_SUFFIX else None
    if not path.is_dir():
        return None
    found = sorted(p for p in path.glob("*" + GGUF_SUFFIX) if p.is_file())
    heads = [p for p in found if not SPLIT_PATTERN.match(p.name) or SPLIT_PATTERN.match(p.name)["index"] == "00001"]
    if len(heads) > 1:
        raise InputError(f"{str(path)!r} holds several GGUF models {[p.name for p in heads][:5]}; "
                         "pass the one to merge onto as --base (its file, or the first file of a split set)")
    return heads[0] if heads else None


@dataclass(frozen=True)
class GGUFCheckpoint(CheckpointLayout):
    """A GGUF model's layout under HF names; ``gguf`` holds its metadata and reader tensors."""

    gguf: GGUFBase = field(default=None, repr=False, compare=False)  # type: ignore[assignment]
    permute: dict[str, int] = field(default_factory=dict)
    """HF name → heads of the converter's Q/K permutation (only permuted tensors)."""


def _header_sha(path: Path, end: int) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read(min(end, FINGERPRINT_BYTES))).hexdigest()


# gguf-py parses every element of the tokenizer arrays (seconds for a 50k-150k vocabulary); the
# planner, the sinks and the worker of one job open the same base, so the last few layouts are kept,
# keyed by path, size and modification time.
_OPENED: OrderedDict[tuple[str, int, int], GGUFCheckpoint] = OrderedDict()
OPENED_KEPT = 2


def open_gguf_checkpoint(path: str | Path) -> GGUFCheckpoint:
    """The layout of a GGUF model (a file, the first file of a split set, or a directory holding one).

    Raises:
        InputError: no GGUF there, an unsupported architecture, a tensor type gguf-py cannot
            dequantize, or a tensor with no HF name (each named with its file and the way out).
    """
    given = Path(path)
    first = find_gguf(given)
    if first is None:
        raise InputError(f"{str(given)!r} is not a GGUF file and holds none")
    stat = first.stat()
    key = (str(first.resolve()), stat.st_size, stat.st_mtime_ns)
    if key in _OPENED:
        _OPENED.move_to_end(key)
        return _OPENED[key]
    layout = _open(first)
    _OPENED[key] = layout
    while len(_OPENED) > OPENED_KEPT:
        _OPENED.popitem(last=False)
    return layout


def _open(first: Path) -> GGUFCheckpoint:
    base = GGUFBase(first)
    readable = _dequantized_types()
    headers: dict[Path, SafetensorsHeader] = {}
    shard_of: dict[str, Path] = {}
    by_gguf = {ref.gguf_name: hf for hf, ref in base.tensors.items()}
    for file, reader in zip(base.files, base.readers):
        infos: dict[str, TensorInfo] = {}
        for t in reader.tensors:
            hf = by_gguf.get(t.name)
            if hf is None:
                if t.name in GENERATED_TENSORS:
                    continue
                raise InputError(f"GGUF base {str(file)!r}: tensor {t.name!r} has no Hugging Face name for "
                                 f"architecture {base.arch!r}, so it cannot be merged or written as an HF model; "
                                 "convert the GGUF to an HF model first and pass that directory as --base")
            if t.tensor_type.name not in readable:
                raise InputError(f"GGUF base {str(file)!r}: tensor {t.name!r} is stored as {t.tensor_type.name}, "
                                 f"which gguf-py cannot dequantize (readable: {sorted(readable)}); re-quantize "
                                 "the model with llama-quantize to e.g. Q8_0 or Q4_K_M, or use an HF base")
            ref = base.tensors[hf]
            infos[hf] = TensorInfo(hf, GGUF_DTYPE_PREFIX + t.tensor_type.name, ref.shape, int(t.data_offset),
                                   int(t.data_offset) + int(t.n_bytes))
            shard_of[hf] = file
        size = file.stat().st_size
        headers[file] = SafetensorsHeader(file, infos, {}, reader.data_offset, size,
                                          _header_sha(file, reader.data_offset))
    permute = {hf: n for hf in base.tensors if (n := base.permute_heads(hf))}
    return GGUFCheckpoint(first.parent, tuple(base.files), headers, shard_of, None, gguf=base, permute=permute)


class GGUFCheckpointReader(CheckpointReader):
    """``CheckpointReader`` over a GGUF model: rows dequantized to float32, HF orientation."""

    layout: GGUFCheckpoint

    def read_rows(self, name: str, start: int, stop: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Rows ``start:stop`` of ``name`` dequantized (float32 unless ``dtype``), in HF layout."""
        gguf = gguf_module()
        info = self.layout.info(name)
        qtype = gguf.GGMLQuantizationType[ggml_type_of(info.dtype)]
        if len(info.shape) < 2:  # biases and norms: small, read whole
            return self._dequantize(name, 0, 1, qtype).reshape(info.shape)[start:stop].clone().to(dtype or torch.float32)
        rows = info.shape[0]
        heads = self.layout.permute.get(name, 0)
        period = rows // heads if heads else 1
        first, end = start - start % period, min(rows, -(-stop // period) * period)
        out = self._dequantize(name, first, end, qtype).reshape(end - first, *info.shape[1:])
        if heads:
            out = unpermute_rows(out, (end - first) // period)
        if (first, end) != (start, stop):
            out = out[start - first:stop - first].clone()
        return out if dtype is None else out.to(dtype)

    @contextmanager
    def stored_rows(self, name: str, start: int, stop: int | None = None) -> Iterator[torch.Tensor]:
        """Rows ``start:stop`` as the worker's transfer path reads them: a GGUF tensor has no torch dtype
        to move as stored, so its rows come dequantized to float32 (a fresh tensor, not a view of the map)."""
        info = self.layout.info(name)
        if stop is None:
            stop = info.shape[0] if info.shape else 1
        yield self.read_rows(name, start, stop)

    def _dequantize(self, name: str, first: int, end: int, qtype: object) -> torch.Tensor:
        """Stored rows ``first:end`` of ``name`` (a 1-D tensor is one row) as float32, still in GGUF order."""
        info = self.layout.info(name)
        row_bytes = info.nbytes // (info.shape[0] if len(info.shape) > 1 else 1)
        mm = self._map(self.layout.shard_of[name])
        begin = info.begin + first * row_bytes
        count = (end - first) * row_bytes
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            raw = np.frombuffer(mm, dtype=np.uint8, count=count, offset=begin).reshape(end - first, row_bytes)
            values = gguf_module().quants.dequantize(raw, qtype)
            values = values.astype(np.float32, copy=not values.flags.owndata)  # F32 is a view of the map
        del raw
        self._release(mm, begin, begin + count)
        return torch.from_numpy(values)
