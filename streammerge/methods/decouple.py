"""DO-Merging steps 2–3: split each task update into magnitudes and unit directions.

``m_i`` = norms of ``ΔW_i`` along ``norm_axis`` (``row``: one per output unit, ``col``: one per
input feature, ``matrix``: one scalar); ``D_i = diag(1/m_i) ΔW_i``.  Magnitudes are averaged,
directions summed: ``ΔW* = λ diag(m̄) Σ_i D_i = λ Σ_i diag(m̄/m_i) ΔW_i``.  The second form keeps
LoRA inputs exactly low-rank: only the rows of ``B_i`` (or, for ``col``, the columns of
``A_i``) are rescaled, with norms taken from ``r × r`` Grams.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import DenseUpdate, LowRankUpdate, Param, TaskUpdate, stack_low_rank
from .common import accumulate
from .lowrank import col_norms, frobenius_norm, row_norms

__all__ = ["NORM_AXES", "DIRECTION_REDUCES", "DECOUPLE_PARAMS", "switch", "magnitudes", "inverse_magnitudes",
           "rescale", "mean_magnitude", "decoupled_merge", "unit_direction", "recombine"]

NORM_AXES = ("row", "col", "matrix")
DIRECTION_REDUCES = ("sum", "mean")

DECOUPLE_PARAMS: tuple[Param, ...] = (
    Param("norm_axis", str, "row",
          "magnitude per output row (row), per input column (col) or one per matrix (matrix)", choices=NORM_AXES),
    Param("eps", float, 1e-6, "a row with m_i < eps·max(m_i) gets direction 0", minimum=0.0),
)


def switch(default: bool) -> Param:
    """The ``decouple`` on/off parameter with a method-specific default."""
    return Param("decouple", bool, default, "merge magnitudes and directions separately (DO-Merging step 2)")


def magnitudes(update: TaskUpdate, axis: str) -> torch.Tensor:
    """``m_i`` of one 2-D update: ``[d_out]`` (row), ``[d_in]`` (col) or ``[1]`` (matrix)."""
    if axis == "row":
        return row_norms(update)
    if axis == "col":
        return col_norms(update)
    return frobenius_norm(update).reshape(1)


def inverse_magnitudes(m: torch.Tensor, eps: float) -> torch.Tensor:
    """``1/m``, with 0 where ``m <= eps · max(m)``: a (near-)zero row has no direction to keep."""
    keep = m > eps * m.max()
    return torch.where(keep, m.clamp_min(torch.finfo(m.dtype).tiny).reciprocal(), torch.zeros_like(m))


def rescale(update: TaskUpdate, factor: torch.Tensor, axis: str) -> TaskUpdate:
    """``diag(factor) ΔW`` (row, matrix) or ``ΔW diag(factor)`` (col); low-rank stays low-rank."""
    if isinstance(update, LowRankUpdate):
        if axis == "col":
            return LowRankUpdate(up=update.up, down=update.down * factor[None, :])
        return LowRankUpdate(up=update.up * (factor[:, None] if axis == "row" else factor), down=update.down)
    if axis == "row":
        return DenseUpdate(update.delta * factor[:, None])
    return DenseUpdate(update.delta * factor)  # "col" broadcasts over the last axis, "matrix" is [1]


def mean_magnitude(updates: Sequence[TaskUpdate], axis: str) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Every task's ``m_i`` and their mean ``m̄``."""
    mags = [magnitudes(u, axis) for u in updates]
    return mags, torch.stack(mags).mean(dim=0)


def decoupled_merge(updates: Sequence[TaskUpdate], axis: str, direction_reduce: str, eps: float,
                    scale: float) -> TaskUpdate:
    """``λ diag(m̄) · reduce_i(D_i)`` computed as ``Σ_i diag(λ m̄ / m_i [/T]) ΔW_i``.

    Args:
        updates: 2-D task updates (weights already folded in).
        axis: ``row``, ``col`` or ``matrix``.
        direction_reduce: ``sum`` (default of the spec) or ``mean`` (divides by T).
        eps: relative guard for tiny magnitudes.
        scale: λ.

    Returns:
        A ``LowRankUpdate`` of rank ``Σ r_i`` when every input is low-rank, else a dense one built
        one input at a time.
    """
    mags, mbar = mean_magnitude(updates, axis)
    coef = scale / len(updates) if direction_reduce == "mean" else scale
    factors = [mbar * inverse_magnitudes(m, eps) * coef for m in mags]
    if all(isinstance(u, LowRankUpdate) for u in updates):
        return stack_low_rank([rescale(u, f, axis) for u, f in zip(updates, factors)],  # type: ignore[misc]
                              [1.0] * len(updates))
    return DenseUpdate(accumulate(lambda u=u, f=f: rescale(u, f, axis).dense() for u, f in zip(updates, factors)))


def unit_direction(update: TaskUpdate, m: torch.Tensor, axis: str, eps: float) -> torch.Tensor:
    """The dense unit-norm direction ``D_i`` (a fresh tensor), for methods that edit directions."""
    return rescale(update, inverse_magnitudes(m, eps), axis).dense()


def recombine(direction: torch.Tensor, mbar: torch.Tensor, axis: str) -> torch.Tensor:
    """``diag(m̄) D`` (row, matrix) or ``D diag(m̄)`` (col), in place on ``direction``."""
    return direction.mul_(mbar[:, None] if axis == "row" else mbar)
