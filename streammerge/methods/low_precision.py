"""mergekit's generalized task arithmetic computed in bf16 / fp16, op for op (``compute_dtype``).

With ``dtype: bfloat16`` mergekit 0.1.5 loads every tensor in bf16 and runs
``generalized_task_arithmetic.py`` / ``sparsify.py`` on bf16 tensors: each torch op computes in fp32
and rounds its result to bf16, and the reductions over the inputs accumulate in fp32 and round once.
This module does the same ops in the same order on the same values, so the bytes match:

1. ``δ_i = fl(M_i − W0)``: here ``fl(τ_i)`` of the fp32 task vector ``τ_i = M_i − W0``, the same value
   when ``M_i`` and ``W0`` hold compute-dtype values (torch's bf16 subtraction is the fp32 one, rounded);
   the worker rounds every loaded tensor to the compute dtype first, as mergekit loads in ``dtype``.
   A LoRA (``τ_i = s·B·A``, factors as stored) gives ``fl(fl(W0 + s·B·A) − W0)``, the task vector of the
   copy mergekit merges with PEFT in the compute dtype (``--lora-merge-dtype`` equal to ``dtype``), up to
   the fp32 rounding of the product (PEFT computes ``(B·A)·s``, we ``(s·B)·A``; equal after the rounding
   on the small preset's q_proj);
2. sparsify ``δ_i`` (unweighted): the magnitude trim and the whole-tensor band pick entries from
   torch's ``argsort`` / ``sort`` of the flattened ``|δ_i|`` as mergekit does (ties in that sort's
   order, so bit-identical with the same torch build on the same device type); DARE multiplies by our
   seeded mask (mergekit draws from torch's global generator); ``rescale: l1`` as mergekit's
   ``rescaled_masked_tensor``;
3. ``δ_i · fl(w_i)`` (the weight itself rounded: 0.3 becomes 0.30078 in bf16);
4. TIES: sign of ``fl(Σ_i δ_i)`` (``>= 0`` elects +), ``fl(Σ_i δ_i·[agree])`` over
   ``fl(Σ_i fl(w_i)·[agree])`` (0 → 1); otherwise ``fl(Σ_i δ_i)`` over ``fl(Σ_i fl(w_i))``
   (below 1e-8 → 1); each sum accumulated in fp32 in input order, rounded once;
5. divided when normalizing, times λ (an fp32 scalar), each rounded.

The engine then adds the update to the fp32 base and rounds to the compute dtype: ``fl(W0 + u)``,
mergekit's last op (then cast to a different ``out_dtype``, as mergekit's writer does).  All of it is
elementwise except the sparsifiers' whole-tensor selections, so this runs on whole tensors (no
row-block form) except for Task Arithmetic.

``load_dtype`` (mergekit's ``linear``, which casts what it loaded to fp32 and rounds its result) keeps
the fp32 arithmetic and only rounds: model tensors on load, each LoRA to its merged copy
(``merged_copies``), the result.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch

from ..errors import MethodParameterError
from .base import DenseUpdate, MergeInputs, Param, TaskUpdate, at_input, divisor_weights
from .common import as_dense
from .sparsify import RandomDrop, keep_count

__all__ = ["COMPUTE_DTYPE", "LOAD_DTYPE", "NARROW_DTYPES", "narrow_dtype", "load_dtype", "merged_copies",
           "check_narrow", "sparsify_narrow", "merge_narrow"]

NARROW_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
COMPUTE_DTYPE = Param("compute_dtype", str, "float32",
                      "dtype every op computes in: float32 (cast once at the end), or bfloat16 / float16 op by op as "
                      "mergekit does with dtype: bfloat16 / float16 (set by a mergekit config's dtype)",
                      choices=("float32", *NARROW_DTYPES))


LOAD_DTYPE = Param("load_dtype", str, "float32",
                   "dtype the model tensors are rounded to on load, LoRA inputs are merged into a copy of the base in "
                   "(fl(W0 + s·B·A)) and the result is rounded to, computing in fp32 in between (mergekit's linear "
                   "with dtype: bfloat16 / float16); a narrow compute_dtype implies it",
                   choices=("float32", *NARROW_DTYPES))


def load_dtype(params: Mapping[str, Any]) -> torch.dtype | None:
    """The dtype loaded model tensors and merged tensors are rounded to: ``load_dtype``, else a narrow
    ``compute_dtype``; None for neither."""
    return NARROW_DTYPES.get(params.get("load_dtype", "float32")) or narrow_dtype(params)


def merged_copies(inputs: MergeInputs, dtype: torch.dtype) -> MergeInputs:
    """``inputs`` with each LoRA update replaced by the fp32 task vector of its merged copy,
    ``fl(W0 + s·B·A) − W0`` (PEFT's ``merge_and_unload`` in ``dtype``, as mergekit's ``model+lora``)."""
    base = inputs.base
    return replace(inputs, updates=tuple(
        u if isinstance(u, DenseUpdate) else DenseUpdate((base + as_dense(u)).to(dtype).float().sub_(base))
        for u in inputs.updates))


def narrow_dtype(params: Mapping[str, Any]) -> torch.dtype | None:
    """The narrow compute dtype ``params`` select, or None for fp32."""
    return NARROW_DTYPES.get(params.get("compute_dtype", "float32"))


def check_narrow(method: str, params: Mapping[str, Any]) -> None:
    """Refuse what the narrow path does not compute: DO-Merging's components, ``lambda: auto``,
    ``scope: global`` (all fp32 statistics of our own, not mergekit's), Breadcrumbs' per-row band."""
    if narrow_dtype(params) is None:
        return
    clashes = [name for name, bad in (("orthogonalize", params.get("orthogonalize")),
                                      ("decouple", params.get("decouple")),
                                      ("lambda: auto", params.get("lambda") == "auto"),
                                      ("scope: global", params.get("scope", "tensor") == "global"),
                                      ("band: row", params.get("band") == "row")) if bad]
    if clashes:
        raise MethodParameterError(
            f"method {method!r}: compute_dtype {params['compute_dtype']!r} reproduces mergekit's generalized task "
            f"arithmetic op by op and cannot be combined with {', '.join(clashes)}; use compute_dtype float32")


def _mask_of(delta: torch.Tensor, picked: torch.Tensor) -> torch.Tensor:
    mask = torch.zeros(delta.numel(), dtype=delta.dtype, device=delta.device)
    mask[picked] = 1
    return mask.reshape_as(delta)


def _magnitudes(delta: torch.Tensor) -> torch.Tensor:
    w = delta.abs().reshape(-1)
    return w.float() if w.device.type == "cpu" else w  # mergekit sorts fp32 on the CPU


def _trim_mask(delta: torch.Tensor, density: float, at_least: int) -> torch.Tensor | None:
    """mergekit's ``magnitude``: the top ``max(1, int(density·n))`` of ``|δ|`` by ``argsort``; None keeps all."""
    if density >= 1:
        return None
    if density <= 0 or delta.numel() == 0:
        return torch.zeros_like(delta)
    k = keep_count(density, delta.numel(), at_least)
    return _mask_of(delta, torch.argsort(_magnitudes(delta), descending=True)[:k])


def _band_mask(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor | None:
    """mergekit's ``magnitude_outliers``: drop the top ``int(gamma·n)``, keep the next ``int(density·n)``."""
    if density >= 1:
        return None
    n = delta.numel()
    keep, top = int(density * n), int(gamma * n)
    bottom = max(0, n - keep - top)
    return _mask_of(delta, torch.sort(_magnitudes(delta), descending=False).indices[bottom:bottom + keep])


def sparsify_narrow(kind: str, delta: torch.Tensor, index: int, params: Mapping[str, Any],
                    drop: RandomDrop | None) -> torch.Tensor:
    """Input ``index``'s narrow ``delta`` sparsified as mergekit's ``sparsify`` does (a new tensor)."""
    density = at_input(params.get("density", 1.0), index)
    if kind == "magnitude":
        mask = _trim_mask(delta, density, params.get("min_keep", 0))
    elif kind == "band":  # the whole flattened tensor (check_narrow refuses band: row)
        mask = _band_mask(delta, density, at_input(params["gamma"], index))
    elif kind == "random" and density < 1:
        assert drop is not None
        mask = drop.mask(delta.shape, index).to(delta.dtype)
    else:
        return delta
    if mask is None:
        return delta
    masked = delta * mask
    rescale = params.get("rescale", "none")
    if rescale == "density":
        return masked / density if density > 0 else masked
    if rescale != "l1":
        return masked
    before, after = delta.abs().sum(), masked.abs().sum()
    if before < 1e-7 or after < 1e-7:
        return masked
    return masked * (before / after)


def _rounded_sum(terms: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """``Σ terms`` accumulated in fp32 in order and rounded once (torch's ``stack(...).sum(0)`` in ``dtype``)."""
    total = terms[0].float()
    for term in terms[1:]:
        total = total + term.float()
    return total.to(dtype)


def _delta(update: TaskUpdate, base: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``fl(τ)`` of a dense update; of a LoRA ``fl(fl(W0 + s·B·A) − W0)``: mergekit's task vector of the copy
    PEFT merges in ``dtype`` (``merge_and_unload`` adds the fp32 product to the ``dtype`` weight, rounding once)."""
    if isinstance(update, DenseUpdate):
        return as_dense(update).to(dtype)
    return (base + as_dense(update)).to(dtype) - base.to(dtype)


def merge_narrow(inputs: MergeInputs, params: Mapping[str, Any], sparsify: str, elect: bool) -> torch.Tensor:
    """The merged update of ``inputs`` computed in ``params['compute_dtype']`` (steps 1–5 above), as fp32."""
    dtype = narrow_dtype(params)
    assert dtype is not None
    count = len(inputs.updates)
    drop = None
    if sparsify == "random":
        drop = RandomDrop(params["density"], inputs.generator, count, "none")
    deltas = [sparsify_narrow(sparsify, _delta(u, inputs.base, dtype), i, params, drop)
              for i, u in enumerate(inputs.updates)]
    weights = [torch.tensor(w, dtype=dtype, device=inputs.base.device) for w in inputs.weights]
    deltas = [d.mul_(w) for d, w in zip(deltas, weights)]
    normalize, divisor_of = divisor_weights(params, inputs.weights)
    if elect:
        normalize = params.get("normalize", "count")
        majority = torch.where(_rounded_sum(deltas, dtype) >= 0, 1.0, -1.0).to(dtype)
        agree = [d.sign() == majority for d in deltas]
        mixed = _rounded_sum([d * a for d, a in zip(deltas, agree)], dtype)
        marks = weights if normalize == "weights" else [torch.ones((), dtype=dtype, device=w.device) for w in weights]
        divisor = _rounded_sum([m * a for m, a in zip(marks, agree)], dtype)
        divisor[divisor == 0] = 1
        normalize = "none" if normalize == "none" else "weights"
    else:
        mixed = _rounded_sum(deltas, dtype)
        divisor = _rounded_sum([torch.tensor(w, dtype=dtype, device=mixed.device) for w in divisor_of],
                               dtype).reshape(())
        if float(divisor.abs()) < 1e-8:
            divisor = torch.ones((), dtype=dtype, device=mixed.device)
    if normalize == "weights":
        mixed /= divisor
    if params["lambda"] != 1:
        mixed *= params["lambda"]
    return mixed.float()
