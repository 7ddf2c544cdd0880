"""``lambda: auto`` / ``alpha: auto``: a data-free scale for the merged update, per tensor.

The rule: scale the method's merged update ``U`` (computed at scale 1) so that its Frobenius
norm is the mean norm of the task updates it merges::

    λ_auto = mean_i ‖w_i ΔW_i‖_F / ‖U‖_F

so the merged model moves as far from the base, tensor by tensor, as one typical fine-tune
did.  For Task Arithmetic of ``T`` mutually orthogonal updates of equal norm that is
``1/√T``; of ``T`` identical ones ``1/T`` (their mean).  Norms of LoRA updates come from
``r × r`` Grams, so no dense delta is built.  The chosen value is the ``lambda_auto`` statistic
(min / mean / max over tensors in the CLI summary).  An all-zero merged update keeps scale 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .base import DenseUpdate, LowRankUpdate, Param, TaskUpdate
from .lowrank import frobenius_norm

__all__ = ["AUTO", "ScaleParam", "scale_param", "auto_scale", "scale_factor", "scaled", "apply_scale"]

AUTO = "auto"
STAT = "lambda_auto"


@dataclass(frozen=True)
class ScaleParam(Param):
    """A float scale that also accepts ``auto`` (the rule in this module's docstring)."""

    def coerce(self, method: str, value: Any) -> Any:
        if isinstance(value, str) and value.strip().lower() == AUTO:
            return AUTO
        return super().coerce(method, value)


def scale_param(name: str, default: float, help_text: str) -> ScaleParam:
    return ScaleParam(name, float, default, f"{help_text}, or 'auto' (merged norm = mean task-update norm)")


def auto_scale(updates: Sequence[TaskUpdate], merged: TaskUpdate) -> float:
    """``mean_i ‖ΔW_i‖_F / ‖U‖_F`` (1.0 when ``U`` is zero); ``updates`` already weighted."""
    norm = float(frobenius_norm(merged))
    if norm == 0.0 or not updates:
        return 1.0
    return sum(float(frobenius_norm(u)) for u in updates) / len(updates) / norm


def scaled(update: TaskUpdate, factor: float) -> TaskUpdate:
    """``factor · ΔW`` (on ``up`` for a low-rank update)."""
    if isinstance(update, LowRankUpdate):
        return LowRankUpdate(up=update.up * factor, down=update.down)
    return DenseUpdate(update.delta * factor)


def scale_factor(value: float | str, updates: Sequence[TaskUpdate], merged: TaskUpdate,
                 stats: dict[str, float]) -> float:
    """The numeric ``value``, or the auto rule's factor for ``merged`` (recorded in ``stats``)."""
    if value != AUTO:
        return float(value)
    factor = auto_scale(updates, merged)
    stats[STAT] = factor
    return factor


def apply_scale(value: float | str, updates: Sequence[TaskUpdate], merged: TaskUpdate,
                stats: dict[str, float]) -> TaskUpdate:
    """``merged`` (at scale 1) times ``scale_factor(...)``."""
    factor = scale_factor(value, updates, merged, stats)
    return merged if factor == 1.0 else scaled(merged, factor)
