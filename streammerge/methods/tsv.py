"""TSV-M, Task Singular Vectors merge (Gargiulo et al., CVPR 2025).

Per 2-D tensor: SVD each task update ``ΔW_i = U_i diag(σ_i) V_iᵀ`` and keep
``k_i = min(⌊min(d_out, d_in)/T⌋, rank(ΔW_i))`` components — truncating at the true rank, since
the null directions of a rank-r LoRA would take part in the next step as noise.  Stack the
kept ``U_i`` and ``V_i``, replace each stack by its orthogonal polar factor (removing the
interference between tasks' singular vectors) and return ``ΔW* = α U⊥ diag(σ) V⊥ᵀ``, an exact
low-rank update of rank ``Σ k_i``.  LoRA inputs take the QR route (no dense delta); non-matrix
tensors get the weighted average.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .autoscale import apply_scale, scale_param
from .base import LowRankUpdate, MergeInputs, MergeMethod, MergeResult, Param
from .common import fold_weights, is_matrix, weighted_average
from .lowrank import polar, update_svd

PARAMS: tuple[Param, ...] = (scale_param("alpha", 1.0, "scale α of the merged update"),)


def task_singular_vectors(inputs: MergeInputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each task's kept ``U_i``, ``σ_i``, ``V_iᵀ``, stacked: ``[d_out, K]``, ``[K]``, ``[K, d_in]``."""
    updates = fold_weights(inputs)
    budget = min(inputs.base.shape) // len(updates)
    us, ss, vhs = [], [], []
    for update in updates:
        u, s, vh = update_svd(update)  # already cut at the numerical rank
        k = min(budget, s.numel())
        us.append(u[:, :k])
        ss.append(s[:k])
        vhs.append(vh[:k])
    return torch.cat(us, dim=1), torch.cat(ss), torch.cat(vhs, dim=0)


def merge(inputs: MergeInputs, params: Mapping[str, Any]) -> MergeResult:
    """TSV-M merge of one tensor; see the module docstring."""
    if not is_matrix(inputs):
        return MergeResult(weighted_average(inputs, "tsv"))
    u, s, vh = task_singular_vectors(inputs)
    if s.numel() == 0:  # every update is zero
        return MergeResult(LowRankUpdate(up=u, down=vh), {"tsv_rank": 0.0})
    stats = {"tsv_rank": float(s.numel())}
    merged = LowRankUpdate(up=polar(u) * s, down=polar(vh.T).T)
    return MergeResult(apply_scale(params["alpha"], fold_weights(inputs), merged, stats), stats)


METHOD = MergeMethod(
    name="tsv",
    summary="TSV-M: per-task truncated SVD, orthogonalize the stacked singular vectors (polar), α",
    params=PARAMS,
    merge=merge,
)
