"""Combine sparsified dense deltas: plain sum, or TIES sign election + disjoint mean.

Deltas are produced on demand by ``term(i)`` (a fresh fp32 tensor each call, which the
sparsifier and the accumulators may overwrite) and freed after
use, so at most one delta plus the accumulators is alive — never all T deltas.  Election needs
two passes over the inputs; the sparsifiers make the second pass see the same entries.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch

from .common import accumulate
from .sparsify import Sparsifier

__all__ = ["Term", "elect_sign", "weight_sum", "agreeing_mean", "disjoint_mean", "combine"]

Term = Callable[[int], torch.Tensor]


def elect_sign(count: int, term: Term, sparsify: Sparsifier) -> torch.Tensor:
    """TIES election: ``+1`` where ``Σ_i sparsify(ΔW_i) >= 0`` (a zero sum elects +), else ``-1``.

    ``copysign`` gives -1 only for a negative sum or ``-0``, and a sum is ``-0`` only when every
    term is a zero, where no input agrees whatever the sign.
    """
    total = accumulate(lambda i=i: sparsify(term(i), i) for i in range(count))
    return torch.copysign(torch.ones((), device=total.device), total, out=total)


def weight_sum(weights: Sequence[float], device: torch.device) -> torch.Tensor:
    """``Σ_i w_i`` in fp32, summed in input order (as mergekit's ``weights.sum(dim=0)``); a sum
    below 1e-8 in magnitude becomes 1 (mergekit's guard), so dividing by it is always defined."""
    total = torch.tensor(list(weights), dtype=torch.float32, device=device).reshape(-1, 1).sum(dim=0).reshape(())
    return total if float(total.abs()) >= 1e-8 else torch.ones((), device=device)


def agreeing_mean(terms: Iterable[torch.Tensor], sign: torch.Tensor, normalize: str = "count",
                  weights: Sequence[float] = (), mark: torch.Tensor | None = None) -> torch.Tensor:
    """The entries that are non-zero and have the elected ``sign``, summed and divided by ``normalize``:
    ``count`` the number of agreeing inputs (TIES' disjoint mean), ``weights`` the sum of their user
    weights (mergekit), ``none`` nothing (mergekit's ``normalize: false``); 0 where none agrees.
    Overwrites the terms.

    In float arithmetic, no bool masks: ``relu(δ·γ)`` is ``|δ|`` where δ agrees with γ, else 0;
    its ``sign`` marks the agreeing inputs; ``γ · Σ / divisor`` restores the sign.  The marks are counted
    in ``mark`` (shaped like the terms; a fresh tensor when None) and in the terms after their values were
    added: no fresh tensor per input.
    """
    total: torch.Tensor | None = None
    agreeing: torch.Tensor | None = None
    for i, delta in enumerate(terms):
        kept = delta.mul_(sign).relu_()
        if total is None:  # the first term becomes the sum: its mark goes to the counter first
            if normalize != "none":
                agreeing = torch.sign(kept) if mark is None else torch.sign(kept, out=mark.view_as(kept))
                if normalize == "weights":
                    agreeing.mul_(float(weights[i]))
            total = kept
        else:
            total.add_(kept)
            if normalize != "none":
                kept.sign_()
                if normalize == "weights":
                    kept.mul_(float(weights[i]))
                assert agreeing is not None
                agreeing.add_(kept)
        del delta, kept
    assert total is not None, "agreeing_mean() needs at least one input"
    total.mul_(sign)
    if agreeing is None:
        return total
    if normalize == "weights":
        return total.div_(agreeing.masked_fill_(agreeing == 0, 1.0))
    return total.div_(agreeing.clamp_min_(1))


def disjoint_mean(count: int, term: Term, sparsify: Sparsifier, sign: torch.Tensor, normalize: str = "count",
                  weights: Sequence[float] = ()) -> torch.Tensor:
    """Agreeing entries over the inputs (``agreeing_mean``), built one input at a time."""
    return agreeing_mean((sparsify(term(i), i) for i in range(count)), sign, normalize, weights)


def combine(count: int, term: Term, sparsify: Sparsifier, elect: bool, normalize: str = "count",
            weights: Sequence[float] = ()) -> torch.Tensor:
    """``Σ_i sparsify(ΔW_i)``, or with ``elect`` the TIES disjoint mean under the elected sign.

    Args:
        count: number of inputs T.
        term: ``term(i)`` builds input i's dense delta as a fresh tensor.
        sparsify: applied to every delta (``identity`` for none).
        elect: TIES sign election + disjoint mean instead of the sum.
        normalize: divisor of the agreeing sum (``agreeing_mean``); without ``elect``, ``weights``
            divides the sum by ``weight_sum(weights)`` and anything else leaves it as it is.
        weights: the user weights ``w_i`` (for ``normalize: weights``).
    """
    if not elect:
        total = accumulate(lambda i=i: sparsify(term(i), i) for i in range(count))
        return total.div_(weight_sum(weights, total.device)) if normalize == "weights" else total
    sign = elect_sign(count, term, sparsify)
    return disjoint_mean(count, term, sparsify, sign, normalize, weights)
