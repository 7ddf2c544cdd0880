"""Combine sparsified dense deltas: plain sum, or TIES sign election + disjoint mean.

Deltas are produced on demand by ``term(i)`` (a fresh fp32 tensor each call, which the
sparsifier and the accumulators may overwrite) and freed after
use, so at most one delta plus the accumulators is alive — never all T deltas.  Election needs
two passes over the inputs; the sparsifiers make the second pass see the same entries.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .common import accumulate
from .sparsify import Sparsifier

__all__ = ["Term", "elect_sign", "disjoint_mean", "combine"]

Term = Callable[[int], torch.Tensor]


def elect_sign(count: int, term: Term, sparsify: Sparsifier) -> torch.Tensor:
    """TIES election: True where ``Σ_i sparsify(ΔW_i) >= 0`` (a zero sum elects +)."""
    total = accumulate(lambda i=i: sparsify(term(i), i) for i in range(count))
    return total >= 0


def disjoint_mean(count: int, term: Term, sparsify: Sparsifier, positive: torch.Tensor) -> torch.Tensor:
    """Mean over the inputs whose entry is non-zero and has the elected sign (0 where none does)."""
    total: torch.Tensor | None = None
    agreeing: torch.Tensor | None = None
    for i in range(count):
        delta = sparsify(term(i), i)
        agree = (delta != 0) & ((delta > 0) == positive)
        kept = delta.mul_(agree)  # term() hands out a fresh tensor
        total = kept if total is None else total.add_(kept)
        agreeing = agree.float() if agreeing is None else agreeing.add_(agree)
        del delta, agree, kept
    assert total is not None and agreeing is not None, "disjoint_mean() needs at least one input"
    return total.div_(agreeing.clamp_min_(1))


def combine(count: int, term: Term, sparsify: Sparsifier, elect: bool) -> torch.Tensor:
    """``Σ_i sparsify(ΔW_i)``, or with ``elect`` the TIES disjoint mean under the elected sign.

    Args:
        count: number of inputs T.
        term: ``term(i)`` builds input i's dense delta as a fresh tensor.
        sparsify: applied to every delta (``identity`` for none).
        elect: TIES sign election + disjoint mean instead of the sum.
    """
    if not elect:
        return accumulate(lambda i=i: sparsify(term(i), i) for i in range(count))
    positive = elect_sign(count, term, sparsify)
    return disjoint_mean(count, term, sparsify, positive)
