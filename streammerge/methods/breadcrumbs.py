"""Model Breadcrumbs (Davari & Belilovsky, 2024): per output row drop the largest ``gamma``
fraction by ``|value|`` (outliers) and keep the next ``density`` fraction, then Task
Arithmetic with λ.  Composes with DO-Merging's orthogonalize/decouple.
"""

from __future__ import annotations

from .base import LAMBDA
from .generalized import GAMMA, Variant, density_param, make_method

METHOD = make_method(
    "breadcrumbs",
    "Breadcrumbs: per row drop top gamma, keep next density by |value|, then Task Arithmetic; λ",
    Variant(sparsify="band", elect_sign=False, composable=True),
    (density_param(0.1), GAMMA, LAMBDA),
)
