"""Model Breadcrumbs with TIES sign election: the per-row band mask of ``breadcrumbs``, then
sign election and disjoint mean, ``W = W0 + λ τ*``.
"""

from __future__ import annotations

from .base import LAMBDA
from .generalized import GAMMA, Variant, density_param, make_method

METHOD = make_method(
    "breadcrumbs_ties",
    "Breadcrumbs band mask, then TIES sign election + disjoint mean; λ",
    Variant(sparsify="band", elect_sign=True, composable=True),
    (density_param(0.1), GAMMA, LAMBDA),
)
