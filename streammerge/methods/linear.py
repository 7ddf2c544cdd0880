"""Linear average: ``W = W0 + Σ_i w_i ΔW_i / Σ_i w_i``, the weighted average of the fine-tuned
weights.  Exact rank-``Σ r_i`` for LoRA inputs, like Task Arithmetic.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .base import MergeInputs, MergeMethod, MergeResult
from .common import weighted_average


def merge(inputs: MergeInputs, params: Mapping[str, Any]) -> MergeResult:
    """The weighted average of the inputs' updates (weights must not sum to 0)."""
    return MergeResult(weighted_average(inputs, "linear"))


METHOD = MergeMethod(
    name="linear",
    summary="weighted average W0 + Σ w_i ΔW_i / Σ w_i; exact rank-Σr for LoRA inputs",
    params=(),
    merge=merge,
)
