"""Merge methods: one file each, pure tensor math, listed in one explicit registry."""

from __future__ import annotations

from ..errors import MethodParameterError
from . import task_arithmetic
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
    )
}


def get_method(name: str) -> MergeMethod:
    """The registered method called ``name``."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise MethodParameterError(
            f"unknown merge method {name!r}; available: {', '.join(sorted(REGISTRY))}") from None
