"""DARE + Task Arithmetic (Yu et al., 2024): drop each entry with probability ``1 − density``,
rescale the kept ones by ``1/density``, then ``W = W0 + λ Σ_i w_i DARE(ΔW_i)``.

Masks are drawn from the tensor's seeded generator only, so a run is reproducible per seed.
"""

from __future__ import annotations

from .base import LAMBDA
from .generalized import Variant, density_param, make_method

METHOD = make_method(
    "dare_linear",
    "DARE: random drop with rescale 1/density, then Task Arithmetic; λ",
    Variant(sparsify="random", elect_sign=False),
    (density_param(0.1), LAMBDA),
)
