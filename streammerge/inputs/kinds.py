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
- ``full``: a full fine-tune's tensor; ``ΔW = value − W0``.

The functions are pure: they receive loaded fp32 tensors (or row blocks of them) and the base
values, and return a ``TaskPart``; the worker decides what to read and where.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

__all__ = ["InputKind", "KINDS", "LORA", "LORA_BIAS", "REPLACEMENT", "FULL", "TaskPart", "ContributionLike",
           "kind_of"]


class ContributionLike(Protocol):
    """The fields of a plan contribution the kinds read (``planning.plan.Contribution``)."""

    kind: str
    file: str
    keys: tuple[str, ...]
    scale: float
    transposed: bool


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
        update: (contribution, load, base in canonical orientation, whether the stored tensor is the
            transpose of the canonical one) → its part of the update.
        rows: (contribution, load_rows, base rows, start, stop, factors) → the part for rows
            ``start:stop``; ``factors`` are the contribution's loaded (up, down) for low-rank kinds.
    """

    name: str
    low_rank: bool
    whole_tensor: bool
    needs_base_values: bool
    checked_before_job: bool
    dense_in_adapter: bool
    update: Callable[[ContributionLike, Load, torch.Tensor, bool], TaskPart | None]
    rows: Callable[[ContributionLike, LoadRows, torch.Tensor, int, int, tuple[torch.Tensor, torch.Tensor] | None],
                   TaskPart]


def lora_factors(c: ContributionLike, load: Load) -> tuple[torch.Tensor, torch.Tensor]:
    """(s · B, A) of a LoRA contribution."""
    return load(c.file, c.keys[1]).mul_(c.scale), load(c.file, c.keys[0])


def _lora_update(c: ContributionLike, load: Load, base: torch.Tensor, transposed: bool) -> TaskPart:
    up, down = lora_factors(c, load)
    return TaskPart(up=up, down=down)


def _lora_rows(c: ContributionLike, load_rows: LoadRows, base_rows: torch.Tensor, start: int, stop: int,
               factors: tuple[torch.Tensor, torch.Tensor] | None) -> TaskPart:
    assert factors is not None, "the worker loads a LoRA contribution's factors once per tensor"
    up, down = factors
    return TaskPart(up=up[start:stop], down=down)


def _bias_update(c: ContributionLike, load: Load, base: torch.Tensor, transposed: bool) -> TaskPart:
    return TaskPart(delta=load(c.file, c.keys[0]).mul_(c.scale))


def _bias_rows(c: ContributionLike, load_rows: LoadRows, base_rows: torch.Tensor, start: int, stop: int,
               factors: tuple[torch.Tensor, torch.Tensor] | None) -> TaskPart:
    return TaskPart(delta=load_rows(c.file, c.keys[0], start, stop).mul_(c.scale))


def _difference_update(c: ContributionLike, load: Load, base: torch.Tensor, transposed: bool) -> TaskPart | None:
    value = load(c.file, c.keys[0])
    value = value.T if transposed else value
    if torch.equal(value, base):
        return None  # e.g. an embedding layer PEFT saved unchanged
    return TaskPart(delta=value.sub_(base))


def _difference_rows(c: ContributionLike, load_rows: LoadRows, base_rows: torch.Tensor, start: int, stop: int,
                     factors: tuple[torch.Tensor, torch.Tensor] | None) -> TaskPart:
    return TaskPart(delta=load_rows(c.file, c.keys[0], start, stop).sub_(base_rows))


LORA = InputKind("lora", low_rank=True, whole_tensor=False, needs_base_values=False, checked_before_job=True,
                 dense_in_adapter=False, update=_lora_update, rows=_lora_rows)
LORA_BIAS = InputKind("lora_bias", low_rank=False, whole_tensor=False, needs_base_values=False,
                      checked_before_job=True, dense_in_adapter=False, update=_bias_update, rows=_bias_rows)
REPLACEMENT = InputKind("replacement", low_rank=False, whole_tensor=True, needs_base_values=True,
                        checked_before_job=True, dense_in_adapter=True, update=_difference_update,
                        rows=_difference_rows)
FULL = InputKind("full", low_rank=False, whole_tensor=True, needs_base_values=True, checked_before_job=False,
                 dense_in_adapter=True, update=_difference_update, rows=_difference_rows)

KINDS: dict[str, InputKind] = {k.name: k for k in (LORA, LORA_BIAS, REPLACEMENT, FULL)}


def kind_of(c: ContributionLike) -> InputKind:
    """The table entry of a contribution."""
    return KINDS[c.kind]
