"""Block-scaled FP8 checkpoints (DeepSeek-V3, Qwen3-FP8): dequantize and requantize row blocks.

Layout, as transformers' ``integrations/finegrained_fp8.py`` reads and writes it: a linear
weight ``<m>.weight`` ``[rows, cols]`` is ``float8_e4m3fn`` (``F8_E4M3``) and its sibling
``<m>.weight_scale_inv`` ``[⌈rows/bm⌉, ⌈cols/bn⌉]`` (fp32, or ``float8_e8m0fnu`` with
``scale_fmt: ue8m0``) holds one factor per ``bm × bn`` block (``weight_block_size``, usually
``[128, 128]``); ``W = weight · weight_scale_inv`` block-wise, edge blocks partial.  Tensors
the format leaves alone (norms, embeddings, ``lm_head``, ``modules_to_not_convert``) are
plain bf16 and have no scale.  Quantizing a block (transformers' ``Fp8Quantize``):
``scale = 448 / amax`` (1 for an all-zero block), ``q = clamp(x · scale, ±448)`` cast to
e4m3, ``weight_scale_inv = 1 / scale`` (ue8m0: rounded up to a power of two first).

Row blocks that start on a multiple of ``bm`` dequantize and requantize independently, so an
FP8 base streams like any other; everything here is pure tensor math on fp32.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import InputError
from .header import TensorInfo

__all__ = [
    "FP8_DTYPE", "FP8_MAX", "SCALE_INV_SUFFIX", "Fp8Format", "read_fp8_format", "scale_inv_name",
    "scale_grid_shape", "fp8_weight_scales", "aligned_block_rows", "dequantize_rows", "quantize_rows",
    "without_quantization_config",
]

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
SCALE_INV_SUFFIX = "weight_scale_inv"
QUANTIZATION_CONFIG_KEY = "quantization_config"
_UE8M0_DTYPE = getattr(torch, "float8_e8m0fnu", None)


@dataclass(frozen=True)
class Fp8Format:
    """The FP8 settings of a checkpoint (``config.json`` → ``quantization_config``)."""

    block_rows: int = 128
    block_cols: int = 128
    scale_fmt: str = "float"  # "float" (fp32 scale_inv) or "ue8m0" (power-of-two scale_inv)

    @property
    def block(self) -> tuple[int, int]:
        return self.block_rows, self.block_cols


def read_fp8_format(config: Mapping[str, Any], where: str) -> Fp8Format | None:
    """The FP8 format of a model ``config.json``; None if it is not an FP8 checkpoint.

    Raises:
        InputError: ``quant_method: fp8`` with a layout streammerge cannot stream (per-tensor
            scales, a bad block size, FP4 experts, an unknown scale format).
    """
    quant = config.get(QUANTIZATION_CONFIG_KEY)
    if not isinstance(quant, Mapping) or quant.get("quant_method") != "fp8":
        return None
    block = quant.get("weight_block_size")
    if (not isinstance(block, list | tuple) or len(block) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        raise InputError(f"{where}: quantization_config.weight_block_size={block!r} is not supported: streammerge "
                         "merges block-scaled FP8 ([rows, cols] blocks, e.g. [128, 128]); per-tensor FP8 scales "
                         "cannot be streamed row block by row block")
    scale_fmt = quant.get("scale_fmt") or "float"
    if scale_fmt not in ("float", "ue8m0") or (scale_fmt == "ue8m0" and _UE8M0_DTYPE is None):
        raise InputError(f"{where}: quantization_config.scale_fmt={scale_fmt!r} is not supported "
                         "(use 'float' or 'ue8m0')")
    if quant.get("expert_dtype", "fp8") != "fp8":
        raise InputError(f"{where}: quantization_config.expert_dtype={quant['expert_dtype']!r} is not supported: "
                         "only FP8 (e4m3) weights can be merged, not FP4 experts")
    fmt = quant.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise InputError(f"{where}: quantization_config.fmt={fmt!r} is not supported: only float8_e4m3fn weights")
    return Fp8Format(block_rows=block[0], block_cols=block[1], scale_fmt=scale_fmt)


def without_quantization_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config.json`` for a bf16 output of an FP8 base: the same, ``quantization_config`` dropped."""
    return {k: v for k, v in config.items() if k != QUANTIZATION_CONFIG_KEY}


def scale_inv_name(weight_name: str) -> str:
    """``<m>.weight`` → ``<m>.weight_scale_inv`` (transformers' naming)."""
    if not weight_name.endswith(".weight"):
        raise InputError(f"FP8 tensor {weight_name!r} does not end in '.weight', so it has no weight_scale_inv")
    return weight_name[: -len("weight")] + SCALE_INV_SUFFIX


def scale_grid_shape(shape: tuple[int, ...] | list[int], fmt: Fp8Format) -> tuple[int, int]:
    """``[⌈rows/bm⌉, ⌈cols/bn⌉]``: the shape ``weight_scale_inv`` must have for a 2-D ``shape``."""
    if len(shape) != 2:
        raise InputError(f"FP8 weights must be 2-D to be merged, got shape {list(shape)}")
    return math.ceil(shape[0] / fmt.block_rows), math.ceil(shape[1] / fmt.block_cols)


_SCALE_DTYPES = frozenset({"F32", "BF16", "F8_E8M0"})


def fp8_weight_scales(tensors: Mapping[str, TensorInfo], fmt: Fp8Format, where: str) -> dict[str, str]:
    """``{fp8 weight name: its weight_scale_inv name}`` for a checkpoint's tensors, every pair checked.

    Raises:
        InputError: an ``F8_E4M3`` tensor without its scale, a scale of the wrong shape or
            dtype, or a scale without its weight (names the tensors and shapes).
    """
    pairs: dict[str, str] = {}
    for name, info in tensors.items():
        if info.dtype != "F8_E4M3":
            continue
        scale = scale_inv_name(name)
        scale_info = tensors.get(scale)
        if scale_info is None:
            raise InputError(f"{where}: FP8 tensor {name!r} has no {scale!r}; block-scaled FP8 needs one scale per "
                             f"{fmt.block_rows}x{fmt.block_cols} block")
        grid = scale_grid_shape(info.shape, fmt)
        if tuple(scale_info.shape) != grid or scale_info.dtype not in _SCALE_DTYPES:
            raise InputError(f"{where}: {scale!r} is {scale_info.dtype} {list(scale_info.shape)}, expected "
                             f"{list(grid)} (one of {sorted(_SCALE_DTYPES)}) for {name!r} {list(info.shape)} "
                             f"with weight_block_size {list(fmt.block)}")
        pairs[name] = scale
    orphans = sorted(n for n in tensors if n.endswith("." + SCALE_INV_SUFFIX)
                     and n[: -len(SCALE_INV_SUFFIX)] + "weight" not in pairs)
    if orphans:
        raise InputError(f"{where}: {orphans[0]!r} (and {len(orphans) - 1} more) has no float8_e4m3fn weight beside it")
    return pairs


def aligned_block_rows(block_rows: int, fmt: Fp8Format) -> int:
    """The largest multiple of the FP8 block height ``<= block_rows`` (at least one block)."""
    return max(fmt.block_rows, block_rows - block_rows % fmt.block_rows)


def _check_start(start: int, fmt: Fp8Format) -> None:
    if start % fmt.block_rows:
        raise ValueError(f"FP8 row blocks must start on a multiple of {fmt.block_rows} rows, got {start}")


def _expand(scale: torch.Tensor, rows: int, cols: int, fmt: Fp8Format) -> torch.Tensor:
    """A ``[n_br, n_bc]`` block grid repeated to ``[rows, cols]`` (edge blocks cut)."""
    full = scale.repeat_interleave(fmt.block_rows, dim=0)[:rows]
    return full.repeat_interleave(fmt.block_cols, dim=1)[:, :cols]


def dequantize_rows(weight_rows: torch.Tensor, scale_inv_rows: torch.Tensor, start: int,
                    fmt: Fp8Format) -> torch.Tensor:
    """fp32 ``W[start:start+n]`` from its FP8 rows and their rows of the scale grid.

    Args:
        weight_rows: ``weight[start:stop]`` as stored (float8_e4m3fn).
        scale_inv_rows: ``weight_scale_inv[start//bm : ⌈stop/bm⌉]`` as stored.
        start: first row; a multiple of the block height.
        fmt: the checkpoint's FP8 format.
    """
    _check_start(start, fmt)
    rows, cols = weight_rows.shape
    expected = (math.ceil(rows / fmt.block_rows), math.ceil(cols / fmt.block_cols))
    if tuple(scale_inv_rows.shape) != expected:
        raise ValueError(f"FP8 scale rows have shape {list(scale_inv_rows.shape)}, expected {list(expected)} "
                         f"for weight rows {[rows, cols]} with blocks {list(fmt.block)}")
    return weight_rows.float() * _expand(scale_inv_rows.float(), rows, cols, fmt)


def quantize_rows(values: torch.Tensor, start: int, fmt: Fp8Format,
                  scale_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 rows and their fresh ``weight_scale_inv`` rows for fp32 ``values`` (rows ``start:…``).

    Args:
        scale_dtype: how the scales are stored (the base's ``weight_scale_inv`` dtype); None: fp32, or
            float8_e8m0fnu for ``scale_fmt: ue8m0``.  A scale stored in fewer bits than fp32 is rounded
            first (e8m0: up to a power of two, as transformers does; bf16: to nearest) and the block is
            quantized with the reciprocal of the rounded value, so ``weight · weight_scale_inv`` as stored
            dequantizes it (values a rounded-down bf16 scale pushes past ±448 saturate).

    Returns:
        ``(weight_rows float8_e4m3fn, scale_inv_rows)``; for fp32 scales bit-identical to
        transformers' ``Fp8Quantize`` of the same rows.
    """
    _check_start(start, fmt)
    rows, cols = values.shape
    bm, bn = fmt.block
    n_br, n_bc = math.ceil(rows / bm), math.ceil(cols / bn)
    padded = values.new_zeros(n_br * bm, n_bc * bn)  # zero padding never raises a block's amax
    padded[:rows, :cols] = values.float()
    amax = padded.reshape(n_br, bm, n_bc, bn).abs().amax(dim=(1, 3))
    scale = torch.where(amax > 0, FP8_MAX / torch.where(amax > 0, amax, 1.0), 1.0)
    scale_inv = (1.0 / scale).float()
    stored_inv: torch.Tensor = scale_inv
    if fmt.scale_fmt == "ue8m0" or (scale_dtype is not None and scale_dtype == _UE8M0_DTYPE):
        scale_inv = torch.exp2(torch.ceil(torch.log2(scale_inv.clamp(min=torch.finfo(torch.float32).tiny))))
        stored_inv = scale_inv.to(scale_dtype or _UE8M0_DTYPE)
        scale = 1.0 / scale_inv
    elif scale_dtype is not None and scale_dtype != torch.float32:
        stored_inv = scale_inv.to(scale_dtype)
        scale = 1.0 / stored_inv.float()
    quantized = (values.float() * _expand(scale, rows, cols, fmt)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return quantized, stored_inv
