"""TIES-Merging (Yadav et al., 2023): trim, elect sign, disjoint mean.

Per tensor: keep each ``w_i ΔW_i``'s top ``density`` fraction by ``|value|``, elect
``γ = sign(Σ_i trimmed_i)`` (zeros → +), average the entries that are non-zero and agree with
γ, ``W = W0 + λ τ*``.  The trim keeps exactly ``int(density · n)`` entries (ties in flat index
order).  ``scope: global`` (one threshold per input over the whole model, as in the original
code): the engine runs a whole-model first pass (``execution.model_pass``: ``rows.ModelTrim``,
statistics over every tensor's row blocks), journals its ``ModelThresholds`` and hands each
tensor its thresholds (``MergeInputs.statistics`` or the row-block form's ``given``).
"""

from __future__ import annotations

from .autoscale import scale_param
from .generalized import SCOPE, Variant, density_param, make_method

METHOD = make_method(
    "ties",
    "TIES: trim to top density by |value|, elect sign, disjoint mean; λ",
    Variant(sparsify="magnitude", elect_sign=True, composable=True),
    (density_param(0.2), scale_param("lambda", 1.0, "global scale λ of the merged update"), SCOPE),
)
