"""GGUF output when the base itself is a GGUF file: its metadata and untouched tensors carry over.

The layout keeps the base's metadata (``split.*`` dropped, ``general.file_type`` set to the
new type) and its tensor order.  A tensor the merge changes is re-encoded to the --gguf-type
under the converter's per-tensor rule (1-D and norms F32); every other tensor — including
``rope_freqs`` and whatever has no HF name — is copied byte for byte in its original
quantization.  ``write_gguf_from_base`` streams one tensor at a time; ``update`` gives the new
float32 HF-layout value of a changed tensor (the sink's merged ``W0+ΔW``).
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from pathlib import Path

import numpy as np
import torch

from ..inputs.gguf_base import GGUFBase
from .gguf_export import RowEncoder, open_file, plan_files
from .gguf_layout import GGUFLayout, GGUFTensor, MetaEntry, file_type_of, tensor_nbytes, tensor_type

FILE_TYPE_KEY = "general.file_type"


def layout_from_base(base: GGUFBase, gguf_type: str, changed: Collection[str]) -> GGUFLayout:
    """The GGUF layout of ``base`` with the HF tensors in ``changed`` re-encoded to ``gguf_type``."""
    hf_of = {ref.gguf_name: hf for hf, ref in base.tensors.items()}
    heads = {hf: base.permute_heads(hf) for hf in base.tensors}
    tensors = []
    for reader in base.readers:
        for t in reader.tensors:
            hf = hf_of.get(t.name)
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))
            if hf is not None and hf in changed:
                ggml = tensor_type(t.name, len(shape), gguf_type)
                tensors.append(GGUFTensor(hf, t.name, ggml, shape, tensor_nbytes(ggml, shape), heads[hf]))
            else:
                tensors.append(GGUFTensor(hf, t.name, t.tensor_type.name, shape, int(t.n_bytes),
                                          copy_from_base=True))
    metadata = []
    for key, value, vtype, sub in base.metadata_entries():
        if key == FILE_TYPE_KEY and changed:
            value = file_type_of(gguf_type)
        metadata.append(MetaEntry(key, value, vtype, sub))
    return GGUFLayout(base.arch, tuple(metadata), tuple(tensors))


def stored_bytes(base: GGUFBase, gguf_name: str) -> memoryview:
    """The stored bytes of GGUF tensor ``gguf_name`` of ``base`` (one not mapped to an HF name, e.g. rope_freqs)."""
    tensor = next(t for r in base.readers for t in r.tensors if t.name == gguf_name)
    return memoryview(np.ascontiguousarray(tensor.data).view(np.uint8).reshape(-1))


def write_gguf_from_base(base_path: str | Path, out_path: str | Path, gguf_type: str,
                         update: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
                         changed: Collection[str] = (), max_shard_size: int | None = None,
                         ) -> list[tuple[Path, int, str]]:
    """Write a GGUF from a GGUF base: ``changed`` tensors as ``update(hf_name, base value)``, the rest copied.

    Returns:
        ``(path, size, sha256)`` of every file written.
    """
    base = GGUFBase(base_path)
    layout = layout_from_base(base, gguf_type, set(changed))
    stored = {t.name: t for r in base.readers for t in r.tensors}
    written = []
    for plan in plan_files(layout, Path(out_path), max_shard_size):
        with open_file(layout, plan) as writer:
            for tensor in plan.tensors:
                if tensor.copy_from_base:
                    data = np.ascontiguousarray(stored[tensor.name].data).view(np.uint8).reshape(-1)
                    writer.write_bytes(tensor.name, memoryview(data))
                    continue
                assert tensor.hf_name is not None
                value = base.read(tensor.hf_name)
                if update is not None:
                    value = update(tensor.hf_name, value)
                encoder = RowEncoder(tensor)
                writer.write_bytes(tensor.name, encoder.feed(value))
                encoder.finish()
            size, sha = writer.commit()
        written.append((plan.path, size, sha))
    return written
