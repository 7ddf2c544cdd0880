"""Combine sparsified dense deltas: plain sum, or TIES sign election + disjoint mean.

Deltas are produced on demand by ``term(i)`` (a fresh fp32 tensor each call, which the
sparsifier and the accumulators may overwrite) and freed after
use, so at most one delta plus the accumulators is alive — never all T deltas.  Election needs
two passes over the inputs; the sparsifiers make the second pass see the same entries.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from .common import accumulate
from .sparsify import Sparsifier

__all__ = ["Term", "elect_sign", "agreeing_mean", "disjoint_mean", "combine"]

Term = Callable[[int], torch.Tensor]


def elect_sign(count: int, term: Term, sparsify: Sparsifier) -> torch.Tensor:
    """TIES election: ``+1`` where ``Σ_i sparsify(ΔW_i) >= 0`` (a zero sum elects +), else ``-1``.

    ``copysign`` gives -1 only for a negative sum or ``-0``, and a sum is ``-0`` only when every
    term is a zero, where no input agrees whatever the sign.
    """
    total = accumulate(lambda i=i: sparsify(term(i), i) for i in range(count))
    return torch.copysign(torch.ones((), device=total.device), total, out=total)


def agreeing_mean(terms: Iterable[torch.Tensor], sign: torch.Tensor) -> torch.Tensor:
    """Mean of the non-zero entries that have the elected ``sign`` (0 where none does); overwrites the terms.

    In float arithmetic, no bool masks: ``relu(δ·γ)`` is ``|δ|`` where δ agrees with γ, else 0;
    its ``sign`` counts the agreeing inputs; ``γ · Σ / count`` restores the sign.
    """
    total: torch.Tensor | None = None
    agreeing: torch.Tensor | None = None
    for delta in terms:
        kept = delta.mul_(sign).relu_()
        agreeing = kept.sign() if agreeing is None else agreeing.add_(kept.sign())
        total = kept if total is None else total.add_(kept)
        del delta, kept
    assert total is not None and agreeing is not None, "agreeing_mean() needs at least one input"
    return total.mul_(sign).div_(agreeing.clamp_min_(1))


def disjoint_mean(count: int, term: Term, sparsify: Sparsifier, sign: torch.Tensor) -> torch.Tensor:
    """Mean over the inputs whose entry is non-zero and has the elected ``sign`` (0 where none does)."""
    return agreeing_mean((sparsify(term(i), i) for i in range(count)), sign)


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
    sign = elect_sign(count, term, sparsify)
    return disjoint_mean(count, term, sparsify, sign)
