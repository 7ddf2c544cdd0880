"""Shared linear algebra on task updates that never builds a dense delta for a LoRA input.

Row/column/Frobenius norms of ``up @ down`` come from ``r × r`` Gram matrices
(ALGORITHMS.md rule 5); the SVD of a low-rank product is a QR of each factor plus an SVD of
the small core.  Everything here is fp32 on whatever device the inputs live on.
"""

from __future__ import annotations

import torch

from .base import LowRankUpdate, TaskUpdate

__all__ = [
    "RANK_RTOL", "row_norms", "col_norms", "frobenius_norm", "product_svd", "update_svd",
    "concat_svd", "polar", "dense_factors",
]

RANK_RTOL = 1e-5
"""Singular values at or below ``RANK_RTOL · σ_max`` count as zero (KnOTS' cut-off; TSV's true rank)."""


def row_norms(update: TaskUpdate) -> torch.Tensor:
    """``‖ΔW[o, :]‖₂`` for every output row, shape ``[d_out]``.

    Low-rank: ``‖(BA)[o,:]‖² = B[o,:] (A Aᵀ) B[o,:]ᵀ``, an ``r × r`` Gram.
    """
    if isinstance(update, LowRankUpdate):
        gram = update.down @ update.down.T
        squared = ((update.up @ gram) * update.up).sum(dim=1)
        return squared.clamp_min(0).sqrt()  # rounding can push a zero row slightly negative
    return torch.linalg.vector_norm(update.delta, dim=-1)


def col_norms(update: TaskUpdate) -> torch.Tensor:
    """``‖ΔW[:, i]‖₂`` for every input column, shape ``[d_in]`` (Gram ``BᵀB`` for low-rank)."""
    if isinstance(update, LowRankUpdate):
        gram = update.up.T @ update.up
        squared = ((gram @ update.down) * update.down).sum(dim=0)
        return squared.clamp_min(0).sqrt()
    return torch.linalg.vector_norm(update.delta, dim=0)


def frobenius_norm(update: TaskUpdate) -> torch.Tensor:
    """``‖ΔW‖_F`` as a 0-d tensor: ``sqrt(tr((BᵀB)(AAᵀ)))`` for low-rank."""
    if isinstance(update, LowRankUpdate):
        squared = ((update.up.T @ update.up) * (update.down @ update.down.T)).sum()
        return squared.clamp_min(0).sqrt()
    return torch.linalg.vector_norm(update.delta)


def _truncate(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor,
              rtol: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if s.numel() == 0:
        return u, s, vh
    keep = s > rtol * s[0]  # s is sorted descending; an all-zero update keeps nothing
    k = int(keep.sum())
    return u[:, :k], s[:k], vh[:k]


def product_svd(up: torch.Tensor, down: torch.Tensor,
                rtol: float = RANK_RTOL) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ``U diag(s) Vh`` of ``up @ down`` without forming the product.

    ``up = Q_u R_u``, ``downᵀ = Q_d R_d``, SVD of the core ``R_u R_dᵀ`` (at most ``r × r``).

    Args:
        up: ``[d_out, r]``.
        down: ``[r, d_in]``.
        rtol: singular values ``<= rtol · σ_max`` are dropped (the true numerical rank).

    Returns:
        ``U`` ``[d_out, k]`` and ``Vh`` ``[k, d_in]`` with orthonormal columns/rows, ``s`` ``[k]``
        descending, ``k <= r``.
    """
    q_up, r_up = torch.linalg.qr(up)
    q_down, r_down = torch.linalg.qr(down.T)
    u_core, s, vh_core = torch.linalg.svd(r_up @ r_down.T, full_matrices=False)
    u_core, s, vh_core = _truncate(u_core, s, vh_core, rtol)
    return q_up @ u_core, s, vh_core @ q_down.T


def update_svd(update: TaskUpdate, rtol: float = RANK_RTOL) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Truncated thin SVD of one 2-D task update (low-rank route for LoRA, dense SVD otherwise)."""
    if isinstance(update, LowRankUpdate):
        return product_svd(update.up, update.down, rtol)
    u, s, vh = torch.linalg.svd(update.delta, full_matrices=False)
    return _truncate(u, s, vh, rtol)


def concat_svd(updates: list[TaskUpdate],
               rtol: float = RANK_RTOL) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Truncated thin SVD of ``[ΔW_1 … ΔW_T]`` concatenated along the input axis.

    For LoRA inputs the concatenation is ``[B_1 … B_T] · blockdiag(A_1 … A_T)``: QR of both
    factors and an SVD of the ``Σr × Σr`` core; ``Vh`` comes back as ``[k, T·d_in]``.
    """
    if all(isinstance(u, LowRankUpdate) for u in updates):
        up = torch.cat([u.up for u in updates], dim=1)  # type: ignore[union-attr]
        down = torch.block_diag(*[u.down for u in updates])  # type: ignore[union-attr]
        return product_svd(up, down, rtol)
    stacked = torch.cat([u.dense() for u in updates], dim=1)
    u, s, vh = torch.linalg.svd(stacked, full_matrices=False)
    return _truncate(u, s, vh, rtol)


def polar(matrix: torch.Tensor) -> torch.Tensor:
    """The orthogonal polar factor ``P Qᵀ`` of ``matrix = P Σ Qᵀ`` (closest matrix with orthonormal columns)."""
    p, _, qh = torch.linalg.svd(matrix, full_matrices=False)
    return p @ qh


def dense_factors(delta: torch.Tensor, rank: int) -> LowRankUpdate:
    """The best rank-``rank`` approximation of a dense 2-D ``delta`` as balanced factors.

    ``up = U √σ``, ``down = √σ Vᵀ``: splitting σ evenly gives both Grams (``AAᵀ`` and ``BᵀB``)
    the same σ weighting, so orthogonalizing either side treats strong directions alike.
    """
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    k = min(rank, s.numel())
    root = s[:k].sqrt()
    return LowRankUpdate(up=u[:, :k] * root, down=root[:, None] * vh[:k])

