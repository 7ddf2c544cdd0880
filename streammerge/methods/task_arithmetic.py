"""Task Arithmetic: ``W = W0 + λ Σ_i w_i ΔW_i`` (Ilharco et al., 2023).

Exact low-rank for LoRA inputs: the merged update is ``[λ w_1 s_1 B_1 … λ w_T s_T B_T] @
[A_1; …; A_T]``, one GEMM, no dense delta per adapter.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .base import LAMBDA, MergeInputs, MergeMethod, MergeResult, weighted_sum


def merge(inputs: MergeInputs, params: Mapping[str, Any]) -> MergeResult:
    scale = params["lambda"]
    return MergeResult(weighted_sum(inputs.updates, [scale * w for w in inputs.weights]))


METHOD = MergeMethod(
    name="task_arithmetic",
    summary="W0 + λ Σ w_i ΔW_i; exact rank-Σr for LoRA inputs",
    params=(LAMBDA,),
    merge=merge,
    elementwise=True,
)
