"""One generalized sparsify + consensus merge; TIES, DARE, Breadcrumbs and magnitude pruning are
configurations of it (mergekit's "generalized task arithmetic"), not subclasses.

``W = W0 + λ · combine_i(sparsify(w_i ΔW_i))`` where ``combine`` is a sum or the TIES sign
election + disjoint mean.  Composable variants also take DO-Merging's components: orthogonalize
the factors first, and/or run sparsify + combine on the unit directions ``D_i`` and recombine
with the mean magnitude ``m̄``.  Those two apply to 2-D tensors only; other tensors (biases)
are sparsified and combined element-wise like everything else.
Dense deltas are built one input at a time in fp32 (``dense_inputs=True``).  Every variant
also has a row-block form (``MergeMethod.rows``, in ``rows.py``) that gives the same bits.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import torch

from ..errors import MethodParameterError
from . import decouple, orthogonalize, rows
from .autoscale import scale_factor
from .base import (BlockStatistics, DenseUpdate, MergeInputs, MergeMethod, MergeResult, Param, RowBlock, RowMerge,
                   TaskUpdate, divisor_weights)
from .common import as_dense, fold_weights, is_matrix, row_grid
from .consensus import combine
from .low_precision import COMPUTE_DTYPE, check_narrow, merge_narrow, narrow_dtype
from .rows import TensorStatistics
from .selection import Threshold
from .sparsify import MagnitudeTrim, Sparsifier, build_sparsifier

__all__ = ["Variant", "density_param", "normalize_param", "convention_params", "GAMMA", "SCOPE", "RESCALE", "BAND",
           "MIN_KEEP", "make_method", "merge", "row_merge"]

GAMMA = Param("gamma", float, 0.01, "fraction of each row's largest |values| dropped as outliers",
              minimum=0.0, maximum=1.0)
SCOPE = Param("scope", str, "tensor",
              "where the density threshold applies: per tensor, or global (each input keeps its top density "
              "over the whole model, as in the original TIES code; one more pass over the inputs first)",
              choices=("tensor", "global"))


RESCALE = Param("rescale", str, "none",
                "after sparsifying, rescale each delta: 'density' multiplies kept entries by 1/density (DARE), "
                "'l1' restores its L1 norm (mergekit's rescale: true; whole-tensor merge only), 'none'",
                choices=("none", "density", "l1"))
BAND = Param("band", str, "row", "where Breadcrumbs' band applies: per output 'row', or over the whole flattened "
             "'tensor' (mergekit; whole-tensor merge only)", choices=("row", "tensor"))
MIN_KEEP = Param("min_keep", int, 0, "a trim with density > 0 keeps at least this many entries (mergekit: 1)",
                 choices=(0, 1))


def normalize_param(elect: bool) -> Param:
    """How the combined deltas are divided: by the agreeing count (TIES), the (agreeing) weights
    (mergekit's normalize: true) or not at all."""
    if elect:
        return Param("normalize", str, "count", "divide the agreeing sum by the number of agreeing inputs "
                     "('count', TIES), by the sum of their weights ('weights', mergekit) or not at all ('none')",
                     choices=("count", "weights", "none"))
    return Param("normalize", str, "none", "divide the summed deltas by the sum of the weights of the inputs "
                 "that change the tensor ('weights'), of every input ('total': also those that leave it unchanged, "
                 "mergekit's normalize: true) or not at all ('none')", choices=("none", "weights", "total"))


def convention_params(variant: Variant) -> tuple[Param, ...]:
    """The parameters that select a convention (``conventions.py``) for ``variant``."""
    params = [normalize_param(variant.elect_sign)]
    if variant.sparsify == "random":
        params.append(replace(RESCALE, default="density"))
    elif variant.sparsify != "none":
        params.append(replace(RESCALE, choices=("none", "l1")))
    if variant.sparsify == "band":
        params.append(BAND)
    if variant.sparsify == "magnitude":
        params.append(MIN_KEEP)
    params.append(COMPUTE_DTYPE)
    return tuple(params)


def density_param(default: float) -> Param:
    """The ``density`` parameter (fraction of entries kept) with a method-specific default."""
    return Param("density", float, default, "fraction of each delta's entries kept", minimum=0.0, maximum=1.0)


@dataclass(frozen=True)
class Variant:
    """How the generalized merge is configured.

    Attributes:
        sparsify: a key of ``sparsify.SPARSIFIERS`` (``none``, ``magnitude``, ``random``, ``band``).
        elect_sign: TIES sign election + disjoint mean instead of a plain sum.
        composable: accepts ``orthogonalize`` / ``decouple`` (DO-Merging components).
    """

    sparsify: str
    elect_sign: bool
    composable: bool = False


def _validate(method: str, variant: Variant, params: Mapping[str, Any]) -> None:
    density, gamma = params.get("density"), params.get("gamma")
    if variant.sparsify == "random" and density == 0 and params.get("rescale") == "density":
        raise MethodParameterError(
            f"method {method!r}: parameter 'density' must be > 0 (kept entries are rescaled by 1/density), got 0.0")
    if params.get("scope", "tensor") == "global" and (params.get("orthogonalize") or params.get("decouple")):
        raise MethodParameterError(
            f"method {method!r}: scope 'global' selects over the raw task vectors, so it cannot be combined with "
            "orthogonalize or decouple; use scope 'tensor' with them")
    if gamma is not None and density is not None and gamma + density > 1 and params.get("band") != "tensor":
        raise MethodParameterError(
            f"method {method!r}: gamma + density must be <= 1 (a row cannot drop {gamma} and keep {density} "
            f"of its entries), got {gamma + density}")
    check_narrow(method, params)


def merge(inputs: MergeInputs, params: Mapping[str, Any], variant: Variant) -> MergeResult:
    """The generalized merge of one tensor for ``variant``; returns a dense update."""
    if narrow_dtype(params) is not None:  # mergekit's bf16 / fp16 arithmetic, op by op
        return MergeResult(DenseUpdate(merge_narrow(inputs, params, variant.sparsify, variant.elect_sign)))
    updates: list[TaskUpdate] = fold_weights(inputs)
    given = list(updates)
    count = len(updates)
    normalize, weights = divisor_weights(params, inputs.weights)
    normalize = params.get("normalize", "count") if variant.elect_sign else normalize
    stats: dict[str, float] = {}
    components = variant.composable and is_matrix(inputs)
    if components and params["orthogonalize"]:
        settings = orthogonalize.OrthoSettings.from_params(params)
        updates, stats = orthogonalize.orthogonalize_updates(updates, settings, inputs.name)
    if variant.sparsify == "magnitude" and (inputs.statistics is not None or params.get("scope", "tensor") != "tensor"):
        sparsify: Sparsifier = MagnitudeTrim(params["density"], _given_thresholds(inputs, params),
                                             params.get("min_keep", 0))
    else:
        sparsify = build_sparsifier(variant.sparsify, params, inputs.generator, count)
    if components and params["decouple"]:
        axis, eps = params["norm_axis"], params["eps"]
        mags, mbar = decouple.mean_magnitude(updates, axis)
        directions = combine(count, lambda i: decouple.unit_direction(updates[i], mags[i], axis, eps),
                             sparsify, variant.elect_sign, normalize, weights)
        merged = decouple.recombine(directions, mbar, axis)
    else:
        merged = combine(count, lambda i: as_dense(updates[i]), sparsify, variant.elect_sign, normalize, weights)
    factor = scale_factor(params["lambda"], given, DenseUpdate(merged), stats)
    return MergeResult(DenseUpdate(merged.mul_(factor)), stats)


def _given_thresholds(inputs: MergeInputs, params: Mapping[str, Any]) -> tuple[Threshold, ...]:
    """The whole-model thresholds of ``scope: global`` handed in ``inputs.statistics``."""
    if inputs.statistics is None:
        raise MethodParameterError(
            f"tensor {inputs.name!r}: scope {params['scope']!r} needs the whole-model thresholds of a first pass "
            f"over every tensor (rows.ModelTrim); none were given")
    return tuple(inputs.statistics)


def _statistics(variant: Variant, name: str, shape: tuple[int, ...], count: int, generator: torch.Generator,
                params: Mapping[str, Any], given: Any) -> TensorStatistics:
    return TensorStatistics(variant.sparsify, name, shape, count, generator, params, given)


def _merge_rows(variant: Variant, block: RowBlock, stats: BlockStatistics, params: Mapping[str, Any],
                out: torch.Tensor | None) -> torch.Tensor:
    assert isinstance(stats, TensorStatistics)
    return rows.merge_rows(block, stats, params, out, variant.elect_sign)


def _supports_rows(params: Mapping[str, Any]) -> bool:
    # a narrow compute dtype selects with torch's sort of the whole flattened tensor, as mergekit does
    return rows.supports_rows(params) and narrow_dtype(params) is None


def row_merge(variant: Variant) -> RowMerge:
    """The two-pass row-block form of ``variant`` (bit-identical to ``merge``)."""
    return RowMerge(supports=_supports_rows, grid=row_grid, statistics=partial(_statistics, variant),
                    merge_rows=partial(_merge_rows, variant), working_bytes=partial(rows.working_bytes, variant.sparsify))


def make_method(name: str, summary: str, variant: Variant, params: tuple[Param, ...]) -> MergeMethod:
    """A registered method for ``variant``; composable variants get the DO-Merging switches appended."""
    # density and gamma may differ per input (InputSpec.params): the sparsifiers take one value per input.
    params = tuple(replace(p, per_input=True) if p.name in ("density", "gamma") else p for p in params)
    params = (*params, *convention_params(variant))
    if variant.composable:
        params = (*params, orthogonalize.switch(False), decouple.switch(False), *decouple.DECOUPLE_PARAMS,
                  *orthogonalize.ORTHOGONALIZE_PARAMS)
    return MergeMethod(
        name=name,
        summary=summary,
        params=params,
        merge=partial(merge, variant=variant),
        dense_inputs=True,
        uses_random=variant.sparsify == "random",
        validate=partial(_validate, name, variant),
        rows=row_merge(variant),
    )
