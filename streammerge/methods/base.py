"""The interface every merge method implements: pure tensor math, no files, no devices.

The engine hands a method one base tensor at a time with every input's task update for it,
already on the worker device, in fp32, in the **canonical orientation** ``[d_out, d_in]``
of ``nn.Linear`` (the engine transposes GPT-2 ``Conv1D`` / ``fan_in_fan_out`` weights and
embeddings before the call and back after it), with each adapter's scaling ``s_i`` folded
into ``up``.  The method returns the merged *update*; the engine adds it to the base
(``W0 + up @ down`` in one GEMM for low-rank results), casts once and writes.

Methods that need dense deltas may also offer a **row-block form** (``MergeMethod.rows``):
pass 1 feeds row blocks to a statistics object until it needs no further pass, pass 2 merges
one row block at a time from those statistics; the result equals ``merge`` bit for bit and
does not depend on the blocking (see ``RowMerge``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from ..errors import MethodParameterError


@dataclass(frozen=True)
class LowRankUpdate:
    """A task update ``ΔW = up @ down`` (``up`` [d_out, r], ``down`` [r, d_in]), scale folded into ``up``."""

    up: torch.Tensor
    down: torch.Tensor

    @property
    def rank(self) -> int:
        return self.up.shape[1]

    def dense(self) -> torch.Tensor:
        return self.up @ self.down


@dataclass(frozen=True)
class DenseUpdate:
    """A dense task update (full fine-tune task vector, modules_to_save, biases); any shape."""

    delta: torch.Tensor

    def dense(self) -> torch.Tensor:
        return self.delta


TaskUpdate = LowRankUpdate | DenseUpdate


@dataclass(frozen=True)
class MergeInputs:
    """Everything a method sees for one tensor.

    Attributes:
        name: output tensor name (for stats and messages).
        base: base weight ``W0``, fp32, canonical orientation, on the worker device; for a
            method without ``reads_base`` only its shape, dtype and device are meaningful
            (a zero-stride placeholder).
        updates: one task update per input that touches this tensor, in input order.
        weights: the user weight ``w_i`` of each of those inputs.  (Per-input method parameters arrive in
            the params mapping: a ``Param.per_input`` value is one number or a tuple aligned with ``updates``.)
        generator: random generator seeded from (recipe seed, tensor name), on ``base.device``.
        statistics: whole-model statistics for this tensor, aligned with ``updates`` (e.g. the
            per-input thresholds of TIES ``scope: global``); None for per-tensor methods.
    """

    name: str
    base: torch.Tensor
    updates: tuple[TaskUpdate, ...]
    weights: tuple[float, ...]
    generator: torch.Generator
    statistics: Any = None


@dataclass(frozen=True)
class RowBlock:
    """Rows ``start:start + rows`` of one tensor, for a method's row-block form.

    Attributes:
        name: tensor name.
        shape: canonical shape of the whole tensor (rows along the last axis: a 2-D tensor's
            rows, a 1-D tensor is one row).
        start: first row of the block; a multiple of ``RowMerge.grid(shape)``.
        updates: per input, this block's rows: ``DenseUpdate(rows)`` (``[rows, d_in]`` fp32) or
            ``LowRankUpdate(up[start:stop], down)`` (scale folded into ``up``), input order.
        weights: the user weight ``w_i`` of each input.
        inputs: the model-wide index of each input (needed by whole-model statistics only);
            None means ``0 … len(updates) - 1``.
    """

    name: str
    shape: tuple[int, ...]
    start: int
    updates: tuple[TaskUpdate, ...]
    weights: tuple[float, ...]
    inputs: tuple[int, ...] | None = None

    @property
    def rows(self) -> int:
        first = self.updates[0]
        return first.up.shape[0] if isinstance(first, LowRankUpdate) else first.delta.shape[0]


class BlockStatistics(Protocol):
    """What pass 1 accumulates: feed every row block once per pass, then ``end_pass``; repeat
    while ``needs_pass()``.  Blocks may come in any order.

    Before pass 1, ``hint`` may get a first look at each row range of ``sample_ranges()`` (each input's
    update restricted to those rows); it only changes how many passes are needed, never the
    result (a magnitude selection then usually needs one pass instead of two or three).
    """

    def sample_ranges(self) -> list[tuple[int, int]]: ...

    def hint(self, updates: Sequence[TaskUpdate], weights: Sequence[float]) -> None: ...

    def needs_pass(self) -> bool: ...

    def observe(self, block: RowBlock) -> None: ...

    def end_pass(self) -> None: ...


@dataclass(frozen=True)
class RowMerge:
    """The row-block (two-pass) form of a method.

    Attributes:
        supports: ``supports(params)``: whether these parameters can run as row blocks (else the
            engine calls ``merge`` on the whole tensor).
        grid: ``grid(shape)``: rows per grid step; every block starts on a multiple of it (and
            ends on one, or at the last row), which keeps low-rank GEMMs bit-identical.
        statistics: ``statistics(name, shape, count, generator, params, given)`` → the pass-1
            accumulator for a tensor with ``count`` inputs; ``given`` carries whole-model
            statistics (``MergeInputs.statistics``) or None.
        merge_rows: ``merge_rows(block, stats, params, out)`` → the merged update's rows
            (fp32 ``[rows, d_in]``); with ``out`` (the base rows) the update is added into it
            in place and ``out`` is returned.
        working_bytes: ``working_bytes(shape, count, params)`` → bytes the statistics and the
            grid-step temporaries hold for a tensor of ``shape`` with ``count`` inputs, beyond the
            row blocks (for the memory estimate).
    """

    supports: Callable[[Mapping[str, Any]], bool]
    grid: Callable[[tuple[int, ...]], int]
    statistics: Callable[[str, tuple[int, ...], int, torch.Generator, Mapping[str, Any], Any], BlockStatistics]
    merge_rows: Callable[[RowBlock, BlockStatistics, Mapping[str, Any], torch.Tensor | None], torch.Tensor]
    working_bytes: Callable[[tuple[int, ...], int, Mapping[str, Any]], int] = lambda shape, count, params: 0


@dataclass
class MergeResult:
    """A method's answer: the merged update to add to the base, and per-tensor statistics."""

    update: TaskUpdate
    stats: dict[str, float] = field(default_factory=dict)


_PARSERS: dict[type, Callable[[str], Any]] = {
    int: int,
    float: float,
    str: str,
}
_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


@dataclass(frozen=True)
class Param:
    """One declared method parameter (also the CLI help text for ``--param``)."""

    name: str
    kind: type
    default: Any
    help: str
    choices: tuple[Any, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None
    per_input: bool = False
    """An input may set its own value (``InputSpec.params``): the method then gets, for that tensor, one
    number or a tuple with one value per update (``per_input_values``)."""

    def coerce(self, method: str, value: Any) -> Any:
        """Parse a CLI string (or check a recipe value) into this parameter's type and range."""
        try:
            parsed = self._parse(value)
        except (TypeError, ValueError):
            raise MethodParameterError(
                f"method {method!r}: parameter {self.name!r} must be a {self.kind.__name__}, got {value!r}") from None
        if self.choices is not None and parsed not in self.choices:
            raise MethodParameterError(
                f"method {method!r}: parameter {self.name!r} must be one of {list(self.choices)}, got {value!r}")
        if self.minimum is not None and parsed < self.minimum:
            raise MethodParameterError(
                f"method {method!r}: parameter {self.name!r} must be >= {self.minimum}, got {value!r}")
        if self.maximum is not None and parsed > self.maximum:
            raise MethodParameterError(
                f"method {method!r}: parameter {self.name!r} must be <= {self.maximum}, got {value!r}")
        return parsed

    def _parse(self, value: Any) -> Any:
        if self.kind is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in _TRUE:
                return True
            if text in _FALSE:
                return False
            raise ValueError(value)
        if isinstance(value, bool):
            raise TypeError(value)
        if isinstance(value, str):
            return _PARSERS[self.kind](value.strip())
        if self.kind is float and isinstance(value, int):
            return float(value)
        if not isinstance(value, self.kind):
            raise TypeError(value)
        return value


MergeFunction = Callable[[MergeInputs, Mapping[str, Any]], MergeResult]


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method.

    Attributes:
        name: registry name (``--method``).
        summary: one line for ``streammerge methods``.
        params: declared parameters with defaults.
        merge: the pure function ``(MergeInputs, resolved params) -> MergeResult``.
        dense_inputs: True if the method materialises a dense fp32 delta per input
            (sizes the memory estimate); False for exact low-rank methods.
        uses_random: True if results depend on ``MergeInputs.generator``.
        validate: optional check of the resolved parameters as a whole (constraints that
            span several parameters); raises ``MethodParameterError``.
        reads_base: True if the method reads the *values* of ``MergeInputs.base``.  Otherwise
            the engine passes a zero-stride placeholder with the base's shape, dtype and device
            and streams the base through ``W0 + update`` in row blocks, never loading it whole.
        elementwise: True if each merged element depends only on the same element of the base
            and of the updates (no per-tensor statistics, no randomness) and an input whose
            update is zero changes nothing.  The engine then merges dense inputs (full
            fine-tunes, replaced tensors) one row block at a time instead of whole tensors.
        rows: the row-block (two-pass) form, for methods that need whole-tensor statistics
            of dense deltas; None if the method has none.
        merge_many: ``merge`` of several tensors at once (``(list of MergeInputs, params) -> list of
            MergeResult``), for methods whose per-tensor work is many tiny ops (DO-Merging's Adam steps):
            equal tensor problems run as batched ops.  Each result equals ``merge``'s up to floating-point
            reassociation.  None: the engine calls ``merge`` per tensor.
    """

    name: str
    summary: str
    params: tuple[Param, ...]
    merge: MergeFunction
    dense_inputs: bool = False
    uses_random: bool = False
    validate: Callable[[Mapping[str, Any]], None] | None = None
    reads_base: bool = False
    elementwise: bool = False
    rows: RowMerge | None = None
    merge_many: Callable[[Sequence[MergeInputs], Mapping[str, Any]], list[MergeResult]] | None = None

    def resolve_params(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """Defaults overlaid with ``given``, every value validated.

        Raises:
            MethodParameterError: listing unknown names (with the known ones) or the bad value.
        """
        declared = {p.name: p for p in self.params}
        unknown = sorted(set(given) - set(declared))
        if unknown:
            known = ", ".join(declared) or "(none)"
            raise MethodParameterError(
                f"method {self.name!r} has no parameter(s) {', '.join(map(repr, unknown))}; it takes: {known}")
        resolved = {p.name: p.default for p in self.params}
        for key, value in given.items():
            resolved[key] = declared[key].coerce(self.name, value)
        if self.validate is not None:
            self.validate(resolved)
        return resolved


def parse_param_assignment(text: str) -> tuple[str, str]:
    """Split a ``--param name=value`` argument."""
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise MethodParameterError(f"--param expects name=value, got {text!r}")
    return name.strip(), value


LAMBDA = Param("lambda", float, 1.0, "global scale λ of the merged update")


ALL_WEIGHTS = "all_weights"
"""A per-tensor value the engine adds to the params of a method with ``normalize: total``: every input's weight
on this tensor in input order, also of inputs that leave it unchanged (mergekit's ``normalize: true`` divides by
their sum)."""


def divisor_weights(params: Mapping[str, Any], weights: Sequence[float]) -> tuple[str, Sequence[float]]:
    """``normalize`` and the weights whose sum divides a plain (non-electing) sum: ``total`` becomes
    ``weights`` over ``all_weights`` (the inputs' own weights when the engine gave none)."""
    normalize = params.get("normalize", "none")
    if normalize != "total":
        return normalize, weights
    return "weights", params.get(ALL_WEIGHTS, weights)


def at_input(value: Any, index: int) -> Any:
    """Input ``index``'s value of a per-input parameter (one number for all, or a tuple of one each)."""
    return value[index] if isinstance(value, tuple) else value


def stack_low_rank(updates: Sequence[LowRankUpdate], coefficients: Sequence[float]) -> LowRankUpdate:
    """``Σ c_i up_i down_i`` as one exact low-rank update (concatenated factors, rank Σ r_i)."""
    ups = [u.up * c for u, c in zip(updates, coefficients)]
    return LowRankUpdate(up=torch.cat(ups, dim=1), down=torch.cat([u.down for u in updates], dim=0))


def weighted_sum(updates: Sequence[TaskUpdate], coefficients: Sequence[float]) -> TaskUpdate:
    """``Σ c_i ΔW_i``: exact low-rank when every update is low-rank, else one dense tensor.

    Dense deltas are accumulated one input at a time, so at most one extra dense tensor exists.
    """
    if all(isinstance(u, LowRankUpdate) for u in updates):
        return stack_low_rank(updates, coefficients)  # type: ignore[arg-type]
    total: torch.Tensor | None = None
    for update, c in zip(updates, coefficients):
        # Multiply, then add (not add_(alpha=c)): the fused form rounds differently on the vector path
        # than on the tail, and mergekit (deltas * weights, then sum) rounds this way.
        total = update.dense() * c if total is None else total.add_(update.dense() * c)
    assert total is not None
    return DenseUpdate(total)


def apply_update(base: torch.Tensor, update: TaskUpdate) -> torch.Tensor:
    """``W0 + ΔW`` in fp32 (one GEMM for a low-rank update)."""
    if isinstance(update, LowRankUpdate):
        if update.rank == 0:
            return base.clone()
        return torch.addmm(base, update.up, update.down)
    return base + update.delta
