"""Planning an FP8 base (``io/fp8.py``): its format and scale pairs, what ``--dtype`` may say, the tensor order.

An FP8 base is written in bf16 by default (the scales read with their weights and dropped) or, with
``--dtype float8_e4m3fn``, in FP8 again: every FP8 weight keeps its dtype, a merged one gets fresh
block scales written right after it (the streaming writer needs them next, see ``sinks/hf_model.py``),
an untouched one keeps its stored scales, and the tensors the format left unquantized keep theirs.
"""

from __future__ import annotations

from typing import Any

from ..errors import InputError
from ..io.fp8 import Fp8Format, fp8_weight_scales, read_fp8_format
from ..io.reader import CheckpointLayout

__all__ = ["FP8_OUTPUT", "fp8_layout", "fp8_output_problems", "fp8_tensor_order"]

# The safetensors dtype of --dtype float8_e4m3fn.
FP8_OUTPUT = "F8_E4M3"


def fp8_layout(base: CheckpointLayout, config: dict[str, Any],
               problems: list[str]) -> tuple[Fp8Format | None, dict[str, str]]:
    """A block-scaled FP8 base's format and ``{weight: weight_scale_inv}`` (empty for other bases)."""
    where = f"base model {str(base.root)!r}"
    try:
        fmt = read_fp8_format(config, where)
        if fmt is None:
            return None, {}
        scales = fp8_weight_scales({n: base.info(n) for n in base.shard_of}, fmt, where)
    except InputError as e:
        problems.append(str(e))
        return None, {}
    return fmt, scales


def fp8_output_problems(fmt: Fp8Format | None, out_dtype: str | None, output_format: str, base: str) -> list[str]:
    """Why ``--dtype float8_e4m3fn`` cannot be written for this base and output format (empty: it can)."""
    if out_dtype != FP8_OUTPUT:
        return []
    if fmt is None:
        return [f"dtype: float8_e4m3fn output needs a block-scaled FP8 base, and {base!r} is not one (its config.json "
                "has no quantization_config with quant_method 'fp8' and a weight_block_size): the fresh block scales "
                "take the base's block size and scale format; use bfloat16, float16 or float32"]
    if output_format != "model":
        return [f"dtype: float8_e4m3fn is only written with output_format 'model' (a block-scaled FP8 checkpoint), "
                f"not {output_format!r}; leave --dtype out or use bfloat16, float16 or float32"]
    return []


def fp8_tensor_order(names: list[str], scales: dict[str, str], requantize: bool) -> list[str]:
    """The base's tensor names as output tensors: scales left out (bf16 output) or each right after its weight."""
    scale_names = set(scales.values())
    order = []
    for name in names:
        if name in scale_names:
            continue
        order.append(name)
        if requantize and name in scales:
            order.append(scales[name])
    return order
