"""Input kinds as data: what each kind of contribution to a base tensor is, and how it becomes a task update.

A plan records, for every output tensor, the contributions that change it; each names its
kind (``Contribution.kind``, a key of ``KINDS``).  Planning, the memory budget, the pre-flight
checks, the worker and the sinks look the kind up here instead of testing strings, so a new kind
(DoRA, MoE experts, an FP8 base …) is one new entry plus its math.

Every kind turns its stored tensors into a part of one input's task update ``ΔW`` in canonical
``[d_out, d_in]`` orientation:

- ``lora``: factors ``A [r, d_in]``, ``B [d_out, r]``; ``ΔW = s · B @ A`` (kept as factors);
- ``lora_bias``: a LoRA layer's bias; ``Δb = s · bias``;
- ``replacement``: a tensor that replaces the base tensor (``modules_to_save``, saved embedding
  layers); ``ΔW = value − W0``;
- ``full``: a full fine-tune's tensor; ``ΔW = value − W0``;
- ``dora``: a DoRA module (A, B, magnitude m); ``ΔW = m ⊙ (W0 + s·B·A) / ‖W0 + s·B·A‖ − W0`` with
  the norm over each canonical row (PEFT's axis: per output row of a Linear, over the vocabulary
  of an embedding), so dense and computed from the base values (``dora.py``);
- ``expert_lora``: one expert's slice of a PEFT ``target_parameters`` LoRA on fused MoE expert
  parameters, for a checkpoint that stores each expert's matrix on its own (``moe.py``):
  ``ΔW_e = s · B[:, e::E][rows] @ A[e·r:(e+1)·r]`` (kept as factors).

The functions are pure: they receive loaded fp32 tensors (or row blocks of them) and the base
values, and return a ``TaskPart``; the worker decides what to read and where.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from .dora import dora_task_rows

__all__ = ["InputKind", "KINDS", "LORA", "LORA_BIAS", "REPLACEMENT", "FULL", "DORA", "EXPERT_LORA", "TaskPart",
           "ContributionLike", "kind_of", "lora_factors"]


class ContributionLike(Protocol):
    """The fields of a plan contribution the kinds read (``planning.tensor_jobs.Contribution``)."""

    kind: str
    file: str
    keys: tuple[str, ...]
    scale: float
    transposed: bool
    part: tuple[int, ...]


@dataclass
class TaskPart:
    """One contribution's part of an input's task update: factors, or a dense delta (or nothing)."""

    up: torch.Tensor | None = None
    """``s · B`` [d_out(rows), r] when the part is low-rank."""
    down: torch.Tensor | None = None
    """``A`` [r, d_in] when the part is low-rank."""
    delta: torch.Tensor | None = None
    """A dense delta (whole tensor or rows) otherwise."""


Load = Callable[[str, str], torch.Tensor]
"""(file, key) → the whole tensor, fp32, on the worker device."""
LoadRows = Callable[[str, str, int, int], torch.Tensor]
"""(file, key, start, stop) → rows ``start:stop`` of the stored tensor, fp32, on the worker device."""


@dataclass(frozen=True)
class InputKind:
    """What one kind of contribution needs and how it becomes a task update.

    Attributes:
        name: the key stored in plans and journals.
        low_rank: its update is factors (never densified unless the method asks).
        whole_tensor: it brings a tensor as large as the base's (full fine-tunes, replacements),
            so the pre-flight NaN check leaves it to the worker and the budget counts its rows.
        needs_base_values: its update is computed from the base values (value − W0).
        checked_before_job: small adapter-side tensors, checked for NaN / Inf before any output exists.
        dense_in_adapter: an adapter sink must store its update as a truncated SVD (needs ``--rank``).
        peft_factors: ``keys[0]`` / ``keys[1]`` are a PEFT module's ``lora_A`` / ``lora_B`` keys (the
            adapter sink takes module names and the embedding / Conv1D layout from them).
        preload: (contribution, load) → what the worker loads once per tensor and hands to ``rows``
            for every row block (LoRA factors, DoRA's factors and magnitude); None: nothing.
        shared_tensors: many output tensors read the same stored tensors (one MoE factor pair feeds
            every expert): the worker keeps the last few it loaded, and the kind must not modify them.
        update: (contribution, load, base in canonical orientation, whether the stored tensor is the
            transpose of the canonical one) → its part of the update.
        rows: (contribution, load_rows, base rows, start, stop, preloaded) → the part for rows
            ``start:stop`` of the stored tensor (only called for untransposed tensors).
    """

    name: str
    low_rank: bool
    whole_tensor: bool
    needs_base_values: bool
    checked_before_job: bool
    dense_in_adapter: bool
    update: Callable[[ContributionLike, Load, torch.Tensor, bool], TaskPart | None]
    rows: Callable[[ContributionLike, LoadRows, torch.Tensor, int, int, Any], TaskPart]
    peft_factors: bool = False
    preload: Callable[[ContributionLike, Load], Any] | None = None
    shared_tensors: bool = False


def lora_factors(c: ContributionLike, load: Load) -> tuple[torch.Tensor, torch.Tensor]:
    """(s · B, A) of a LoRA contribution."""
    return load(c.file, c.keys[1]).mul_(c.scale), load(c.file, c.keys[0])


def _lora_update(c: ContributionLike, load: Load, base: torch.Tensor, transposed: bool) -> TaskPart:
    up, down = lora_factors(c, load)
    return TaskPart(up=up, down=down)


def _lora_rows(c: ContributionLike, load_rows: LoadRows, base_rows: torch.Tensor, start: int, stop: int,
               preloaded: Any) -> TaskPart:
    up, down = preloaded  # loaded once per tensor (``preload``)
    return TaskPart(up=up[start:stop], down=down)


def _bias_update(c: ContributionLike, load: Load, base: torch.Tensor, transposed: bool) -> TaskPart:
    return TaskPart(delta=load(c.file, c.keys[0]).mul_(c.scale))


def _bias_rows(c: ContributionLike, load_rows: LoadRows, base_rows: torch.Tensor, start: int, stop: int,
               preloaded: Any) -> TaskPart:
    return TaskPart(delta=load_rows(c.file, c.keys[0], start, stop).mul_(c.scale))


def _difference_update(c: ContributionLike, load: Load, base: torch.Tensor, transposed: bool) -> TaskPart | None:
    value = load(c.file, c.keys[0])
    value = value.T if transposed else value
    if torch.equal(value, base):
        return None  # e.g. an embedding layer PEFT saved unchanged
    return TaskPart(delta=value.sub_(base))


def _difference_rows(c: ContributionLike, load_rows: LoadRows, base_rows: torch.Tensor, start: int, stop: int,
                     preloaded: Any) -> TaskPart:
    return TaskPart(delta=load_rows(c.file, c.keys[0], start, stop).sub_(base_rows))


def expert_factors(a: torch.Tensor, b: torch.Tensor, num_experts: int,
                   expert: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A_e [r, d_in], B_e [d_out, r])`` of expert ``expert`` from the saved ``lora_A`` / ``lora_B``."""
    r = a.shape[0] // num_experts
    return a[expert * r:(expert + 1) * r], b[:, expert::num_experts]


def _dora_parts(c: ContributionLike, load: Load) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(s · B, A, m) of a DoRA contribution; keys are (A, B, magnitude)."""
    up, down = lora_factors(c, load)
    return up, down, load(c.file, c.keys[2])


def _dora_update(c: ContributionLike, load: Load, base: torch.Tensor, transposed: bool) -> TaskPart:
    up, down, magnitude = _dora_parts(c, load)
    return TaskPart(delta=dora_task_rows(base, up @ down, magnitude))  # canonical rows: PEFT's norm axis


def _dora_rows(c: ContributionLike, load_rows: LoadRows, base_rows: torch.Tensor, start: int, stop: int,
               preloaded: Any) -> TaskPart:
    up, down, magnitude = preloaded
    return TaskPart(delta=dora_task_rows(base_rows, up[start:stop] @ down, magnitude[start:stop]))


def _expert_factors(c: ContributionLike, load: Load) -> tuple[torch.Tensor, torch.Tensor]:
    """(s · B_e[rows], A_e) of one expert; ``part`` is (expert, experts, first row, end row) of the fused d_out."""
    expert, experts, first, end = c.part
    down, up = expert_factors(load(c.file, c.keys[0]), load(c.file, c.keys[1]), experts, expert)
    return up[first:end] * c.scale, down.clone()  # the loaded factors are shared with the other experts


def _expert_update(c: ContributionLike, load: Load, base: torch.Tensor, transposed: bool) -> TaskPart:
    up, down = _expert_factors(c, load)
    return TaskPart(up=up, down=down)


LORA = InputKind("lora", low_rank=True, whole_tensor=False, needs_base_values=False, checked_before_job=True,
                 dense_in_adapter=False, update=_lora_update, rows=_lora_rows, peft_factors=True, preload=lora_factors)
LORA_BIAS = InputKind("lora_bias", low_rank=False, whole_tensor=False, needs_base_values=False,
                      checked_before_job=True, dense_in_adapter=False, update=_bias_update, rows=_bias_rows)
REPLACEMENT = InputKind("replacement", low_rank=False, whole_tensor=True, needs_base_values=True,
                        checked_before_job=True, dense_in_adapter=True, update=_difference_update,
                        rows=_difference_rows)
FULL = InputKind("full", low_rank=False, whole_tensor=True, needs_base_values=True, checked_before_job=False,
                 dense_in_adapter=True, update=_difference_update, rows=_difference_rows)

DORA = InputKind("dora", low_rank=False, whole_tensor=False, needs_base_values=True, checked_before_job=True,
                 dense_in_adapter=True, update=_dora_update, rows=_dora_rows, peft_factors=True, preload=_dora_parts)
EXPERT_LORA = InputKind("expert_lora", low_rank=True, whole_tensor=False, needs_base_values=False,
                        checked_before_job=True, dense_in_adapter=False, update=_expert_update, rows=_lora_rows,
                        preload=_expert_factors, shared_tensors=True)

KINDS: dict[str, InputKind] = {k.name: k for k in (LORA, LORA_BIAS, REPLACEMENT, FULL, DORA, EXPERT_LORA)}


def kind_of(c: ContributionLike) -> InputKind:
    """The table entry of a contribution."""
    return KINDS[c.kind]
