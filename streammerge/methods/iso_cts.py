"""Iso-CTS, isotropic merging in the common and task-specific subspaces (Marczak et al. 2025).

Per 2-D tensor, with ``M = Σ_i w_i ΔW_i`` and ``K`` the number of directions to fill:

1. *common subspace*: the top ``k`` singular triplets ``U_c, σ_c, V_c`` of ``M``;
2. *task-specific subspaces*: each ``ΔW_i`` projected off the common one,
   ``(I − U_c U_cᵀ) ΔW_i``, gives its top ``n = (K − k) / T`` triplets;
3. stack all ``U`` and all ``V``, replace each stack by its orthogonal polar factor, give every
   direction the mean of the stacked singular values: ``ΔW* = α · mean(σ) · U⊥ V⊥ᵀ``.

Sizes as in the reference (FusionBench ``method/isotropic_merging``): ``k = ⌊K·f⌋`` with
``f = common_space_fraction``, then the task-specific total rounded to a multiple of ``T``
(``round((K − k)/T)·T``) and ``k = K`` minus that.  The reference has ``K = min(d_out, d_in)``;
here ``K = min(d_out, d_in, Σ_i rank ΔW_i)``, the dimension the updates can span — the same
for full fine-tunes, and ``Σ r_i`` for LoRA inputs, whose sum has no more directions (the
reference would fill the rest with an arbitrary completion of the null space and find the
task-specific projections empty).  Directions whose singular value is numerically zero are
dropped rather than padded.  LoRA inputs stay in factor form (QR + small SVD; the projection
acts on ``B_i`` only).  Non-matrix tensors get the weighted average.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .base import DenseUpdate, LowRankUpdate, MergeInputs, MergeMethod, MergeResult, Param, TaskUpdate, weighted_sum
from .common import fold_weights, is_matrix, weighted_average
from .autoscale import apply_scale
from .iso_c import ALPHA
from .lowrank import RANK_RTOL, polar, update_svd

PARAMS: tuple[Param, ...] = (
    ALPHA,
    Param("common_space_fraction", float, 0.8, "share f of the K directions given to the common subspace of the "
          "sum (the rest is split evenly among the tasks' own directions)", minimum=0.0, maximum=1.0),
)


def numerical_rank(update: TaskUpdate) -> int:
    """Singular values above ``RANK_RTOL·σ_max`` (the QR core for LoRA, ``svdvals`` for dense)."""
    if isinstance(update, LowRankUpdate):
        return int(update_svd(update)[1].numel())
    s = torch.linalg.svdvals(update.delta)
    return int((s > RANK_RTOL * s[0]).sum()) if s.numel() and s[0] > 0 else 0


def subspace_sizes(total_dims: int, n_tasks: int, fraction: float) -> tuple[int, int]:
    """``(k, n)``: common directions and directions per task, as FusionBench rounds them."""
    common = int(total_dims * fraction)
    specific = round((total_dims - common) / n_tasks) * n_tasks
    specific = min(specific, (total_dims // n_tasks) * n_tasks)  # never more than K in all
    return total_dims - specific, specific // n_tasks


def project_off(update: TaskUpdate, basis: torch.Tensor) -> TaskUpdate:
    """``(I − Q Qᵀ) ΔW`` for orthonormal columns ``Q``; on ``up`` only for a low-rank update."""
    if isinstance(update, LowRankUpdate):
        return LowRankUpdate(up=update.up - basis @ (basis.T @ update.up), down=update.down)
    return DenseUpdate(update.delta - basis @ (basis.T @ update.delta))


def merge(inputs: MergeInputs, params: Mapping[str, Any]) -> MergeResult:
    """Iso-CTS merge of one tensor; see the module docstring."""
    if not is_matrix(inputs):
        return MergeResult(weighted_average(inputs, "iso_cts"))
    updates = fold_weights(inputs)
    u, s, vh = update_svd(weighted_sum(updates, [1.0] * len(updates)))
    if s.numel() == 0:  # every update is zero
        return MergeResult(LowRankUpdate(up=u, down=vh), {"iso_rank": 0.0, "iso_sigma_mean": 0.0})
    total_dims = min(*inputs.base.shape, sum(numerical_rank(x) for x in updates))
    k, n = subspace_sizes(total_dims, len(updates), params["common_space_fraction"])
    us, ss, vhs = [u[:, :k]], [s[:k]], [vh[:k]]
    if n > 0:
        for update in updates:
            u_i, s_i, vh_i = update_svd(project_off(update, us[0]))
            us.append(u_i[:, :n]), ss.append(s_i[:n]), vhs.append(vh_i[:n])
    sigma = torch.cat(ss).mean()
    merged = LowRankUpdate(up=polar(torch.cat(us, dim=1)) * sigma, down=polar(torch.cat(vhs, dim=0).T).T)
    stats = {"iso_rank": float(merged.rank), "iso_common_rank": float(us[0].shape[1]), "iso_sigma_mean": float(sigma)}
    return MergeResult(apply_scale(params["alpha"], updates, merged, stats), stats)


METHOD = MergeMethod(
    name="iso_cts",
    summary="Iso-CTS: common subspace of the TA sum + each task's own directions, orthogonalized, "
            "isotropic spectrum, α; exact low-rank",
    params=PARAMS,
    merge=merge,
)
