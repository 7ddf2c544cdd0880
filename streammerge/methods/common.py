"""Small pieces every method shares: user weights, non-matrix tensors, accumulation."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

from ..errors import MethodParameterError
from .base import DenseUpdate, LowRankUpdate, MergeInputs, TaskUpdate, weighted_sum

__all__ = ["fold_weights", "is_matrix", "weighted_average", "accumulate", "as_dense", "GRID_ELEMENTS", "row_count",
           "row_grid", "gridded_dense", "block_rows"]

GRID_ELEMENTS = 1 << 18
"""About this many entries (1 MiB of fp32) per grid step of the row-block form: cache-sized."""


def fold_weights(inputs: MergeInputs) -> list[TaskUpdate]:
    """Every update scaled by its user weight ``w_i`` (ALGORITHMS.md rule 1), input order kept.

    Low-rank updates carry the weight in ``up``; the inputs themselves are never modified.
    """
    folded: list[TaskUpdate] = []
    for update, w in zip(inputs.updates, inputs.weights):
        if w == 1.0:
            folded.append(update)
        elif isinstance(update, LowRankUpdate):
            folded.append(LowRankUpdate(up=update.up * w, down=update.down))
        else:
            folded.append(DenseUpdate(update.delta * w))
    return folded


def is_matrix(inputs: MergeInputs) -> bool:
    """True for 2-D tensors, the only ones matrix methods (SVD, row norms, …) apply to."""
    return inputs.base.dim() == 2


def weighted_average(inputs: MergeInputs, method: str) -> TaskUpdate:
    """``Σ w_i ΔW_i / Σ w_i``: how every method merges biases, norms and other non-matrix tensors.

    Raises:
        MethodParameterError: if the input weights sum to zero (the average is undefined).
    """
    total = sum(inputs.weights)
    if total == 0:
        raise MethodParameterError(
            f"method {method!r}: the input weights {list(inputs.weights)} sum to 0, so the weighted average "
            f"for tensor {inputs.name!r} is undefined; give weights with a non-zero sum")
    return weighted_sum(inputs.updates, [w / total for w in inputs.weights])


def accumulate(terms: Iterable[Callable[[], torch.Tensor]]) -> torch.Tensor:
    """Sum dense terms built one at a time, so at most one term and the total are alive at once.

    Each callable must return a fresh tensor: the first one becomes the accumulator.
    """
    total: torch.Tensor | None = None
    for make in terms:
        term = make()
        total = term if total is None else total.add_(term)
        del term
    assert total is not None, "accumulate() needs at least one term"
    return total


def as_dense(update: TaskUpdate) -> torch.Tensor:
    """A fresh dense fp32 tensor for ``update`` that the caller may modify in place.

    A low-rank product is computed on the row grid (``gridded_dense``), so it is bit-identical
    to the row blocks of the two-pass form.
    """
    if isinstance(update, LowRankUpdate):
        return gridded_dense(update)
    return update.delta.clone(memory_format=torch.contiguous_format)


def row_count(shape: tuple[int, ...]) -> int:
    """Rows of a tensor along its last axis (a 1-D tensor is one row, a scalar one entry)."""
    if not shape:
        return 1
    return math.prod(shape[:-1])


def row_grid(shape: tuple[int, ...]) -> int:
    """Rows per grid step for ``shape``: about ``GRID_ELEMENTS`` entries, a multiple of 8 rows.

    Only the shape decides it: the BLAS picks its kernels by the number of rows, and an odd
    remainder takes another kernel whose sums round differently (measured on CPU).  Every GEMM
    of the row-block form and of ``as_dense`` runs on this grid, so both give the same bits.
    """
    columns = shape[-1] if shape else 1
    rows = max(1, GRID_ELEMENTS // max(columns, 1))
    return rows - rows % 8 if rows >= 8 else rows


def gridded_dense(update: LowRankUpdate) -> torch.Tensor:
    """``up @ down`` computed one grid step of rows at a time (see ``row_grid``)."""
    out = update.up.new_empty(update.up.shape[0], update.down.shape[1])
    step = row_grid(tuple(out.shape))
    for lo in range(0, out.shape[0], step):
        torch.mm(update.up[lo:lo + step], update.down, out=out[lo:lo + step])
    return out


def block_rows(update: TaskUpdate, lo: int, hi: int, weight: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """Fresh fp32 rows ``lo:hi`` (of a row block) of ``weight · ΔW``, as ``fold_weights`` + ``as_dense`` give them.

    A low-rank update is ``(w · up[lo:hi]) @ down``: ``lo:hi`` must be one grid step; ``out`` (at least
    ``(hi - lo) · d_in`` fp32 entries) receives it, sparing a fresh allocation (page faults) per step.
    """
    if isinstance(update, LowRankUpdate):
        up = update.up[lo:hi]
        up = up if weight == 1.0 else up * weight
        if out is None:
            return up @ update.down
        return torch.mm(up, update.down, out=out[:up.shape[0] * update.down.shape[1]].view(up.shape[0], -1))
    rows = update.delta[lo:hi]
    return rows.clone(memory_format=torch.contiguous_format) if weight == 1.0 else rows * weight
