"""DO-Merging: Decouple and Orthogonalize (arXiv 2505.15875), as read in ALGORITHMS.md.

Per 2-D tensor: (1) perturb each task's A's and, separately, B's so different tasks' factors
become orthogonal (``orthogonalize.py``); (2) split ``ΔW_i = B̂_i Â_i`` into magnitudes and
unit directions, average the magnitudes, sum the directions (``decouple.py``)::

    ΔW* = λ diag(m̄) Σ_i D_i = λ Σ_i diag(m̄/m_i) B̂_i Â_i

For LoRA inputs that is an exact rank-``Σ r_i`` update; no dense per-adapter delta is built.
Full fine-tunes (``DenseUpdate``) are decoupled on ``τ_i`` directly and orthogonalized through
rank-``svd_rank`` SVD factors.  Both switches off gives Task Arithmetic in product space.
User weights ``w_i`` are folded into ``ΔW_i`` first (rule 1): they scale task i's magnitudes
(and flip its direction if negative).  Non-matrix tensors get the weighted average.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from . import decouple, orthogonalize
from .base import LAMBDA, MergeInputs, MergeMethod, MergeResult, Param, TaskUpdate, weighted_sum
from .common import fold_weights, is_matrix, weighted_average

PARAMS: tuple[Param, ...] = (
    orthogonalize.switch(True),
    decouple.switch(True),
    *decouple.DECOUPLE_PARAMS,
    Param("direction_reduce", str, "sum", "combine the unit directions by sum (spec default) or mean",
          choices=decouple.DIRECTION_REDUCES),
    *orthogonalize.ORTHOGONALIZE_PARAMS,
    LAMBDA,
)


def merge(inputs: MergeInputs, params: Mapping[str, Any]) -> MergeResult:
    """DO-Merging of one tensor; see the module docstring."""
    return merge_many([inputs], params)[0]


def merge_many(batch: Sequence[MergeInputs], params: Mapping[str, Any]) -> list[MergeResult]:
    """DO-Merging of several tensors: their orthogonalization problems of equal shape run as one batch."""
    matrices = [k for k, inputs in enumerate(batch) if is_matrix(inputs)]
    folded = {k: fold_weights(batch[k]) for k in matrices}
    ortho: dict[int, tuple[list[TaskUpdate], dict[str, float]]] = {k: (folded[k], {}) for k in matrices}
    if params["orthogonalize"] and matrices:
        settings = orthogonalize.OrthoSettings.from_params(params)
        done = orthogonalize.orthogonalize_updates_many([folded[k] for k in matrices], settings,
                                                        [batch[k].name for k in matrices])
        ortho = dict(zip(matrices, done))
    results = []
    for k, inputs in enumerate(batch):
        if k not in ortho:
            results.append(MergeResult(weighted_average(inputs, "do_merging")))
            continue
        updates, stats = ortho[k]
        if params["decouple"]:
            update = decouple.decoupled_merge(updates, params["norm_axis"], params["direction_reduce"],
                                              params["eps"], params["lambda"])
        else:
            update = weighted_sum(updates, [params["lambda"]] * len(updates))
        results.append(MergeResult(update, stats))
    return results


METHOD = MergeMethod(
    name="do_merging",
    summary="DO-Merging: orthogonalize factors, average magnitudes, sum directions; exact rank-Σr for LoRA",
    params=PARAMS,
    merge=merge,
    merge_many=merge_many,
)
