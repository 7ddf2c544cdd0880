"""Small pieces every method shares: user weights, non-matrix tensors, accumulation."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from ..errors import MethodParameterError
from .base import DenseUpdate, LowRankUpdate, MergeInputs, TaskUpdate, weighted_sum

__all__ = ["fold_weights", "is_matrix", "weighted_average", "accumulate", "as_dense"]


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
    """A fresh dense fp32 tensor for ``update`` that the caller may modify in place."""
    if isinstance(update, LowRankUpdate):
        return update.dense()
    return update.delta.clone(memory_format=torch.contiguous_format)
