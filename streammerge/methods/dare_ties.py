"""DARE + TIES (Yu et al., 2024): DARE's random drop and ``1/density`` rescale, then TIES sign
election and disjoint mean, ``W = W0 + λ τ*``.  Seeded per tensor; composes with DO-Merging's
orthogonalize/decouple like TIES.
"""

from __future__ import annotations

from .base import LAMBDA
from .generalized import Variant, density_param, make_method

METHOD = make_method(
    "dare_ties",
    "DARE random drop with rescale, then TIES sign election + disjoint mean; λ",
    Variant(sparsify="random", elect_sign=True, composable=True),
    (density_param(0.1), LAMBDA),
)
