"""The safetensors dtype table: names, sizes, torch dtypes and the on-disk sort order."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DtypeInfo:
    """One safetensors dtype.

    Attributes:
        name: the header string, e.g. ``"BF16"``.
        bits: bits per element.
        torch_dtype: the torch dtype, or None where torch has none.
        rank: position in safetensors' ``Dtype`` enum; files order tensors by descending rank.
    """

    name: str
    bits: int
    torch_dtype: torch.dtype | None
    rank: int


def _t(name: str) -> torch.dtype | None:
    return getattr(torch, name, None)


# Order follows the Rust crate's `Dtype` enum: `save_file` sorts tensors by it (descending), then by name.
_TABLE = [
    ("BOOL", 8, torch.bool),
    ("F4", 4, None),
    ("F6_E2M3", 6, None),
    ("F6_E3M2", 6, None),
    ("U8", 8, torch.uint8),
    ("I8", 8, torch.int8),
    ("F8_E5M2", 8, _t("float8_e5m2")),
    ("F8_E4M3", 8, _t("float8_e4m3fn")),
    ("F8_E8M0", 8, _t("float8_e8m0fnu")),
    ("I16", 16, torch.int16),
    ("U16", 16, _t("uint16")),
    ("F16", 16, torch.float16),
    ("BF16", 16, torch.bfloat16),
    ("I32", 32, torch.int32),
    ("U32", 32, _t("uint32")),
    ("F32", 32, torch.float32),
    ("C64", 64, torch.complex64),
    ("F64", 64, torch.float64),
    ("I64", 64, torch.int64),
    ("U64", 64, _t("uint64")),
]

DTYPES: dict[str, DtypeInfo] = {
    name: DtypeInfo(name, bits, tdtype, rank) for rank, (name, bits, tdtype) in enumerate(_TABLE)
}
_BY_TORCH: dict[torch.dtype, DtypeInfo] = {d.torch_dtype: d for d in DTYPES.values() if d.torch_dtype is not None}

FLOAT_DTYPE_NAMES = frozenset({"F16", "BF16", "F32", "F64"})

# User-facing spellings for --dtype.
DTYPE_ALIASES: dict[str, str] = {
    "float32": "F32", "fp32": "F32", "f32": "F32",
    "float16": "F16", "fp16": "F16", "f16": "F16", "half": "F16",
    "bfloat16": "BF16", "bf16": "BF16",
    "float64": "F64", "fp64": "F64",
    "float8_e4m3fn": "F8_E4M3", "fp8": "F8_E4M3", "f8_e4m3": "F8_E4M3",
}


def dtype_info(name: str) -> DtypeInfo:
    """The entry for a header dtype string; KeyError if unknown."""
    return DTYPES[name]


def safetensors_name(dtype: torch.dtype) -> str:
    """The header string of a torch dtype."""
    return _BY_TORCH[dtype].name


def byte_size(dtype_name: str, shape: tuple[int, ...] | list[int]) -> int:
    """Bytes a tensor of ``shape`` takes on disk (sub-byte dtypes rounded up)."""
    numel = 1
    for dim in shape:
        numel *= dim
    return (numel * DTYPES[dtype_name].bits + 7) // 8
