"""Iso-C, isotropic merging in the common subspace (Marczak et al. 2025, arXiv 2502.04959).

Per 2-D tensor: the Task Arithmetic sum ``M = Σ_i w_i ΔW_i = U diag(σ) Vᵀ`` keeps its singular
vectors but gets a flat spectrum, every direction scaled by the mean singular value::

    ΔW* = α · mean(σ) · U Vᵀ

so the few dominant directions of the sum no longer drown the tasks that live in the weaker
ones.  ``σ`` is the spectrum of ``M`` at its numerical rank (``σ > 1e-5·σ_max``): for a full
fine-tune that is every direction, as in the reference implementation (FusionBench
``method/isotropic_merging``, which averages over all ``min(d_out, d_in)`` values); for LoRA
inputs ``M`` has rank ``<= Σ r_i`` and the reference's null directions — an arbitrary
orthonormal completion given the mean value — are left out.  LoRA inputs take the QR route
(``[B_1 … B_T]`` and ``[A_1; …; A_T]``, SVD of the ``Σr × Σr`` core), no dense delta.
Non-matrix tensors get the weighted average (not scaled by α, as for every method here).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .autoscale import apply_scale, scale_param
from .base import LowRankUpdate, MergeInputs, MergeMethod, MergeResult, Param, weighted_sum
from .common import fold_weights, is_matrix, weighted_average
from .lowrank import update_svd

ALPHA = scale_param("alpha", 1.0, "scale α of the isotropic merged update (the paper picks it on validation)")
PARAMS: tuple[Param, ...] = (ALPHA,)


def merge(inputs: MergeInputs, params: Mapping[str, Any]) -> MergeResult:
    """Iso-C merge of one tensor; see the module docstring."""
    if not is_matrix(inputs):
        return MergeResult(weighted_average(inputs, "iso_c"))
    updates = fold_weights(inputs)
    total = weighted_sum(updates, [1.0] * len(updates))
    u, s, vh = update_svd(total)
    if s.numel() == 0:  # every update is zero
        return MergeResult(LowRankUpdate(up=u, down=vh), {"iso_rank": 0.0, "iso_sigma_mean": 0.0})
    sigma = s.mean()
    stats = {"iso_rank": float(s.numel()), "iso_sigma_mean": float(sigma)}
    return MergeResult(apply_scale(params["alpha"], updates, LowRankUpdate(up=u * sigma, down=vh), stats), stats)


METHOD = MergeMethod(
    name="iso_c",
    summary="Iso-C: SVD of the TA sum, spectrum replaced by its mean (isotropic), α; exact low-rank",
    params=PARAMS,
    merge=merge,
)
