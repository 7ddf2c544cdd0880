"""Task Arithmetic: ``W = W0 + λ Σ_i w_i ΔW_i`` (Ilharco et al., 2023); with ``normalize: weights``
``W0 + λ Σ_i w_i ΔW_i / Σ_i w_i``, with ``normalize: total`` divided by every input's weight for the tensor
(mergekit's ``normalize: true``; the engine supplies it as ``all_weights``).  Dense deltas are weighted,
summed, divided and scaled in that order, as mergekit does.

Exact low-rank for LoRA inputs: the merged update is ``[λ w_1 s_1 B_1 … λ w_T s_T B_T] @
[A_1; …; A_T]``, one GEMM, no dense delta per adapter.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import MethodParameterError
from .autoscale import AUTO, apply_scale, scale_param
from .base import DenseUpdate, LowRankUpdate, MergeInputs, MergeMethod, MergeResult, divisor_weights, weighted_sum
from .consensus import weight_sum
from .generalized import normalize_param
from .low_precision import (COMPUTE_DTYPE, LOAD_DTYPE, check_narrow, load_dtype, merge_narrow, merged_copies,
                            narrow_dtype)

LAMBDA = scale_param("lambda", 1.0, "global scale λ of the merged update")


def merge(inputs: MergeInputs, params: Mapping[str, Any]) -> MergeResult:
    scale = params["lambda"]
    if narrow_dtype(params) is not None:  # mergekit's bf16 / fp16 arithmetic, op by op (elementwise)
        return MergeResult(DenseUpdate(merge_narrow(inputs, params, "none", elect=False)))
    copy = load_dtype(params)  # here load_dtype alone: a narrow compute_dtype returned above
    if copy is not None:  # LoRA task vectors against merged copies in that dtype (mergekit's linear in bf16)
        inputs = merged_copies(inputs, copy)
    mode, divisor_of = divisor_weights(params, inputs.weights)
    normalize = mode == "weights"
    if scale != AUTO:
        if all(isinstance(u, LowRankUpdate) for u in inputs.updates):
            divisor = float(weight_sum(divisor_of, inputs.base.device)) if normalize else 1.0
            return MergeResult(weighted_sum(inputs.updates, [scale * w / divisor for w in inputs.weights]))
        total = weighted_sum(inputs.updates, inputs.weights)
        assert isinstance(total, DenseUpdate)
        if normalize:
            total.delta.div_(weight_sum(divisor_of, total.delta.device))
        return MergeResult(DenseUpdate(total.delta.mul_(scale)) if scale != 1.0 else total)
    if normalize or not all(isinstance(u, LowRankUpdate) for u in inputs.updates):
        # The engine merges whole-tensor inputs of an elementwise method one row block at a time,
        # so a per-tensor norm rule would silently become a per-block one.
        raise MethodParameterError(
            f"method 'task_arithmetic': lambda=auto needs LoRA (low-rank) inputs, but tensor {inputs.name!r} "
            "has a dense update (a full fine-tune, modules_to_save or a bias) or normalize: weights; give lambda a "
            "number, or use ties/tsv/iso_c with their auto scale")
    weighted = [LowRankUpdate(up=u.up * w, down=u.down) for u, w in zip(inputs.updates, inputs.weights)]
    stats: dict[str, float] = {}
    merged = apply_scale(AUTO, weighted, weighted_sum(weighted, [1.0] * len(weighted)), stats)
    return MergeResult(merged, stats)


METHOD = MergeMethod(
    name="task_arithmetic",
    summary="W0 + λ Σ w_i ΔW_i (λ a number or auto); exact rank-Σr for LoRA inputs",
    params=(LAMBDA, normalize_param(False), COMPUTE_DTYPE, LOAD_DTYPE),
    merge=merge,
    validate=lambda params: check_narrow("task_arithmetic", params),
    elementwise=True,
)
