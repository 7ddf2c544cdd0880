"""Conventions: named sets of method-parameter defaults that reproduce another tool's arithmetic.

``streammerge`` is every method's own defaults.  ``mergekit`` gives the results of mergekit 0.1.5's
``generalized_task_arithmetic`` family (read from its source, ``merge_methods/registry.py``,
``generalized_task_arithmetic.py``, ``sparsify.py``):

* every sparsifier keeps ``density`` 1.0 (nothing dropped) unless told otherwise;
* TIES divides the agreeing sum by the sum of the agreeing inputs' **weights** (not their count);
  ``dare_ties`` and ``breadcrumbs_ties`` do not divide at all (``normalize: false``);
* DARE restores each delta's L1 norm (``rescale: true``) instead of multiplying by ``1/density``;
* Breadcrumbs bands the whole flattened tensor, not each row;
* the magnitude trim keeps ``max(1, int(density·n))`` entries;
* with ``dtype: bfloat16`` / ``float16`` every op of that family computes in that dtype, as mergekit's
  torch ops on the loaded tensors do (``compute_dtype``, ``methods/low_precision.py``); ``linear``
  computes in fp32 on tensors loaded in that dtype and rounds its result to it (``load_dtype``).

A recipe's explicit ``params`` always win over its convention's defaults.
"""

from __future__ import annotations

from typing import Any

__all__ = ["CONVENTIONS", "DEFAULT_CONVENTION", "MERGEKIT", "convention_defaults", "mergekit_dtype_params"]

DEFAULT_CONVENTION = "streammerge"
MERGEKIT = "mergekit"
CONVENTIONS = (DEFAULT_CONVENTION, MERGEKIT)

_MERGEKIT: dict[str, dict[str, Any]] = {
    "task_arithmetic": {"normalize": "none"},
    "ties": {"density": 1.0, "normalize": "weights", "rescale": "none", "min_keep": 1},
    "magnitude_prune": {"density": 1.0, "normalize": "none", "rescale": "none", "min_keep": 1},
    "dare_ties": {"density": 1.0, "normalize": "none", "rescale": "l1"},
    "dare_linear": {"density": 1.0, "normalize": "none", "rescale": "l1"},
    "breadcrumbs": {"density": 1.0, "gamma": 0.01, "normalize": "none", "rescale": "none", "band": "tensor"},
    "breadcrumbs_ties": {"density": 1.0, "gamma": 0.01, "normalize": "none", "rescale": "none", "band": "tensor"},
}
"""mergekit's defaults per method (``linear`` needs none: both divide by the sum of the weights)."""


def convention_defaults(method: str, convention: str) -> dict[str, Any]:
    """The parameter defaults ``convention`` sets for ``method`` (empty for ``streammerge``)."""
    if convention == MERGEKIT:
        return dict(_MERGEKIT.get(method, {}))
    return {}


NARROW_COMPUTE = ("bfloat16", "float16")
"""The ``dtype`` values of a mergekit config in which its task-arithmetic family computes op by op."""


def mergekit_dtype_params(method: str, dtype: str | None) -> dict[str, str]:
    """The method parameters that reproduce mergekit 0.1.5 merging with ``method`` in ``dtype`` (none for fp32).

    mergekit loads every tensor in ``dtype`` (its ``model+lora`` copies merged in it) and runs its generalized
    task arithmetic on them, each torch op rounding to ``dtype`` (``compute_dtype``); ``linear`` casts the loaded
    tensors to fp32 first and rounds its result to ``dtype`` (``load_dtype``).
    """
    if dtype not in NARROW_COMPUTE:
        return {}
    return {"load_dtype": dtype} if method == "linear" else {"compute_dtype": dtype}
