"""Merge methods: one file each, pure tensor math, listed in one explicit registry."""

from __future__ import annotations

from ..errors import MethodParameterError
from . import (
    breadcrumbs,
    breadcrumbs_ties,
    dare_linear,
    dare_ties,
    do_merging,
    iso_c,
    iso_cts,
    knots,
    linear,
    magnitude_prune,
    task_arithmetic,
    ties,
    tsv,
)
from .base import (
    DenseUpdate,
    LowRankUpdate,
    MergeInputs,
    MergeMethod,
    MergeResult,
    Param,
    TaskUpdate,
    apply_update,
    parse_param_assignment,
)

__all__ = [
    "REGISTRY", "get_method", "DenseUpdate", "LowRankUpdate", "MergeInputs", "MergeMethod",
    "MergeResult", "Param", "TaskUpdate", "apply_update", "parse_param_assignment",
]

REGISTRY: dict[str, MergeMethod] = {
    m.name: m
    for m in (
        task_arithmetic.METHOD,
        do_merging.METHOD,
        linear.METHOD,
        ties.METHOD,
        dare_linear.METHOD,
        dare_ties.METHOD,
        breadcrumbs.METHOD,
        breadcrumbs_ties.METHOD,
        magnitude_prune.METHOD,
        knots.METHOD,
        tsv.METHOD,
        iso_c.METHOD,
        iso_cts.METHOD,
    )
}


def get_method(name: str) -> MergeMethod:
    """The registered method called ``name``."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise MethodParameterError(
            f"unknown merge method {name!r}; available: {', '.join(sorted(REGISTRY))}") from None
