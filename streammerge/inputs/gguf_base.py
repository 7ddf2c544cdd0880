"""A GGUF file (single or llama.cpp split) as a merge base: HF-named tensors, read one at a time.

``io.gguf_read`` memory-maps each file and parses its header; a tensor is dequantized
only when asked for (f32, f16, bf16, q8_0, q4_0/q4_1/q5_0/q5_1 and the K-quants — whatever
``gguf.quants.dequantize`` handles), to float32, in HF orientation: GGUF names are mapped back to
HF names through gguf-py's tensor name map, and the Llama-family Q/K permutation of
``convert_hf_to_gguf.py`` is undone.  ``raw`` gives a tensor's stored bytes for byte-for-byte
copies of untouched tensors.  Memory: one tensor at a time (the dequantized float32 copy; Q/K
of Llama models are un-permuted whole, ``read_rows`` blocks elsewhere).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import InputError
from ..io.gguf_file import unpermute_rows
from ..io.gguf_read import GGUFFileReader

SPLIT_PATTERN = re.compile(r"^(?P<stem>.*)-(?P<index>\d{5})-of-(?P<count>\d{5})\.gguf$")
# HF tensor names of the supported families ({bid} = block index); checked against gguf-py's map.
HF_TEMPLATES = (
    "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
    *(f"model.layers.{{bid}}.{m}" for m in (
        "input_layernorm.weight", "post_attention_layernorm.weight",
        "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
        "self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias", "self_attn.o_proj.bias",
        "self_attn.q_norm.weight", "self_attn.k_norm.weight",
        "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")),
)
PERMUTED_ARCHS = frozenset({"llama"})
SUPPORTED_ARCHS = frozenset({"llama", "qwen2", "qwen3"})


def _gguf() -> Any:
    try:
        import gguf
    except ImportError as e:
        raise InputError("a GGUF base needs the `gguf` package (gguf-py); pip install gguf==0.19.0") from e
    return gguf


def split_files(path: Path) -> list[Path]:
    """Every file of a GGUF model: ``path`` alone, or all splits when it is one of them."""
    match = SPLIT_PATTERN.match(path.name)
    if not match:
        return [path]
    count = int(match["count"])
    files = [path.with_name(f"{match['stem']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise InputError(f"GGUF split {str(path)!r} is part of {count} files, but {missing} do not exist")
    return files


@dataclass(frozen=True)
class GGUFTensorRef:
    """Where one tensor lives: its GGUF name, GGML type, HF shape and the reader tensor."""

    gguf_name: str
    ggml_type: str
    shape: tuple[int, ...]
    tensor: Any


class GGUFBase:
    """The tensors of a GGUF model under their HF names."""

    def __init__(self, path: str | Path) -> None:
        gguf = _gguf()
        self.path = Path(path)
        if not self.path.is_file():
            raise InputError(f"GGUF base {str(self.path)!r} does not exist")
        self.files = split_files(self.path)
        try:
            self.readers = [GGUFFileReader(f) for f in self.files]
        except (ValueError, OSError) as e:
            raise InputError(f"cannot read GGUF base {str(self.path)!r}: {e}") from e
        self.fields: dict[str, Any] = {k: f for r in reversed(self.readers) for k, f in r.fields.items()}
        self.arch = self.value("general.architecture")
        if self.arch not in SUPPORTED_ARCHS:
            raise InputError(f"GGUF base {str(self.path)!r} has architecture {self.arch!r}; a GGUF base can be "
                             f"{sorted(SUPPORTED_ARCHS)}. Convert it to a Hugging Face model first (e.g. "
                             "transformers' from_pretrained(dir, gguf_file=...) then save_pretrained) and pass "
                             "that directory as --base")
        self.block_count = int(self.value(f"{self.arch}.block_count"))
        self.head_count = int(self.value(f"{self.arch}.attention.head_count"))
        self.head_count_kv = int(self.value(f"{self.arch}.attention.head_count_kv", self.head_count))
        hf_of = self._hf_names(gguf)
        self.tensors: dict[str, GGUFTensorRef] = {}
        self.unmapped: list[str] = []
        for reader in self.readers:
            for t in reader.tensors:
                hf = hf_of.get(t.name)
                if hf is None:
                    self.unmapped.append(t.name)  # e.g. rope_freqs.weight, generated from the config
                    continue
                shape = tuple(int(d) for d in reversed(t.shape.tolist()))
                self.tensors[hf] = GGUFTensorRef(t.name, t.tensor_type.name, shape, t)

    def _hf_names(self, gguf: Any) -> dict[str, str]:
        arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == self.arch)
        name_map = gguf.get_tensor_name_map(arch, self.block_count)
        out: dict[str, str] = {}
        for template in HF_TEMPLATES:
            for bid in range(self.block_count) if "{bid}" in template else [None]:
                hf = template.format(bid=bid)
                name = name_map.get_name(hf, try_suffixes=(".weight", ".bias"))
                if name is not None:
                    out.setdefault(name, hf)
        return out

    def value(self, key: str, default: Any = None) -> Any:
        """The value of metadata ``key`` (``InputError`` when absent and no default)."""
        field = self.fields.get(key)
        if field is None:
            if default is not None:
                return default
            raise InputError(f"GGUF base {str(self.path)!r} has no metadata key {key!r}")
        return field.contents()

    def metadata_entries(self) -> list[tuple[str, Any, int, int | None]]:
        """Every key except ``split.*`` as ``(key, value, GGUFValueType, sub_type)``, for a GGUF output."""
        out = []
        for key, field in self.readers[0].fields.items():
            if key.startswith("split.") or key.startswith("GGUF."):
                continue
            sub = int(field.types[1]) if len(field.types) > 1 else None
            out.append((key, field.contents(), int(field.types[0]), sub))
        return out

    @property
    def hf_names(self) -> list[str]:
        return list(self.tensors)

    def permute_heads(self, hf_name: str) -> int:
        """Heads of the converter's Q/K permutation stored for ``hf_name`` (0: not permuted)."""
        if self.arch not in PERMUTED_ARCHS:
            return 0
        if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            return self.head_count
        if hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            return self.head_count_kv
        return 0

    def read(self, hf_name: str) -> torch.Tensor:
        """Tensor ``hf_name`` dequantized to float32, in HF layout."""
        ref = self._ref(hf_name)
        return self.read_rows(hf_name, 0, ref.shape[0] if len(ref.shape) > 1 else 1)

    def read_rows(self, hf_name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of ``hf_name`` (float32, HF layout); permuted Q/K need whole-head bounds."""
        gguf = _gguf()
        ref = self._ref(hf_name)
        qtype = gguf.GGMLQuantizationType[ref.ggml_type]
        data = ref.tensor.data
        if len(ref.shape) > 1:
            data = data.reshape(ref.shape[0], -1)[start:stop]
            shape = (stop - start, *ref.shape[1:])
        else:
            shape = ref.shape
        values = np.ascontiguousarray(gguf.quants.dequantize(np.asarray(data), qtype), dtype=np.float32)
        out = torch.from_numpy(values.reshape(shape).copy())
        heads = self.permute_heads(hf_name)
        if heads:
            period = ref.shape[0] // heads
            if start % period or (stop - start) % period:
                raise InputError(f"rows {start}:{stop} of {hf_name!r} do not fall on whole heads of {period} rows")
            out = unpermute_rows(out, (stop - start) // period)
        return out

    def raw(self, hf_name: str) -> tuple[str, memoryview]:
        """The stored GGML type and bytes of ``hf_name`` (as in the file, still permuted/quantized)."""
        ref = self._ref(hf_name)
        return ref.ggml_type, memoryview(np.ascontiguousarray(ref.tensor.data).view(np.uint8).reshape(-1))

    def _ref(self, hf_name: str) -> GGUFTensorRef:
        ref = self.tensors.get(hf_name)
        if ref is None:
            raise InputError(f"GGUF base {str(self.path)!r} has no tensor for {hf_name!r}")
        return ref
