"""KnOTS (Stoica et al., ICLR 2025): align the tasks' LoRA updates in one shared SVD basis, then
merge their coordinates with TIES (or DARE-TIES).

``[ΔW_1 … ΔW_T] = U diag(s) Vᵀ`` (concatenated along the input axis, ``s > 1e-5·s_max`` kept);
``diag(s) Vᵀ`` split by columns gives per-task ``Z_i`` with ``ΔW_i = U Z_i`` exactly.  TIES on
the ``Z_i`` gives ``Z*`` and ``ΔW* = λ U Z*``, an exact low-rank update of rank ``k <= Σ r_i``.
For LoRA inputs the SVD is a QR of ``[B_1 … B_T]`` and of ``blockdiag(A_i)ᵀ`` plus an SVD of the
``Σr × Σr`` core; the only dense tensors are the ``Z_i`` (``k × d_in``).  ``variant: linear``
sums the ``Z_i`` (no trim, no election), which is exactly Task Arithmetic — a sanity ablation.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import MethodParameterError
from .base import LowRankUpdate, MergeInputs, MergeMethod, MergeResult, Param
from .common import fold_weights, is_matrix, weighted_average
from .consensus import combine
from .generalized import density_param
from .lowrank import concat_svd
from .sparsify import build_sparsifier

VARIANTS: dict[str, tuple[str, bool]] = {  # variant -> (sparsifier, elect sign)
    "ties": ("magnitude", True),
    "dare_ties": ("random", True),
    "linear": ("none", False),
}

PARAMS: tuple[Param, ...] = (
    Param("variant", str, "ties", "how the aligned coordinates Z_i merge: ties, dare_ties, or linear (= TA)",
          choices=tuple(VARIANTS)),
    density_param(1.0),
    Param("lambda", float, 0.5, "global scale λ of the merged update"),
)


def merge(inputs: MergeInputs, params: Mapping[str, Any]) -> MergeResult:
    """KnOTS merge of one tensor; non-matrix tensors get the weighted average."""
    if not is_matrix(inputs):
        return MergeResult(weighted_average(inputs, "knots"))
    updates = fold_weights(inputs)
    u, s, vh = concat_svd(updates)
    if s.numel() == 0:  # every update is zero
        d_out, d_in = inputs.base.shape
        empty = LowRankUpdate(up=inputs.base.new_zeros(d_out, 0), down=inputs.base.new_zeros(0, d_in))
        return MergeResult(empty, {"knots_rank": 0.0})
    coords = (s[:, None] * vh).split(inputs.base.shape[1], dim=1)  # Z_i, [k, d_in] each
    kind, elect = VARIANTS[params["variant"]]
    sparsify = build_sparsifier(kind, params, inputs.generator, len(updates))
    merged = combine(len(updates), lambda i: coords[i].clone(), sparsify, elect)
    return MergeResult(LowRankUpdate(up=u * params["lambda"], down=merged), {"knots_rank": float(s.numel())})


def _validate(params: Mapping[str, Any]) -> None:
    if params["variant"] == "dare_ties" and params["density"] == 0:
        raise MethodParameterError(
            "method 'knots': parameter 'density' must be > 0 with variant 'dare_ties' "
            "(kept entries are rescaled by 1/density), got 0.0")


METHOD = MergeMethod(
    name="knots",
    summary="KnOTS: shared SVD basis of the concatenated updates, TIES on the coordinates; exact low-rank",
    params=PARAMS,
    merge=merge,
    uses_random=True,  # only with variant=dare_ties
    validate=_validate,
)
