"""Magnitude pruning: keep each ``w_i ΔW_i``'s top ``density`` fraction by ``|value|`` (per
tensor) and add them up, ``W = W0 + λ Σ_i trim(w_i ΔW_i)`` (TIES without the election).
"""

from __future__ import annotations

from .base import LAMBDA
from .generalized import Variant, density_param, make_method

METHOD = make_method(
    "magnitude_prune",
    "keep the top density of each delta by |value|, weighted sum; λ",
    Variant(sparsify="magnitude", elect_sign=False),
    (density_param(0.2), LAMBDA),
)
