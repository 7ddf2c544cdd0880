"""The row-block (two-pass) form of the generalized sparsify + consensus merge.

Pass 1 (``TensorStatistics``): only the magnitude trim needs a whole-tensor statistic, each
input's exact top-``k`` threshold, selected over row blocks (``selection.TopKSelect``, two or
three passes); DARE needs only its per-input seeds, Breadcrumbs' bands are per row.  Pass 2
(``merge_rows``): each grid step of rows (about 1 MiB per input, cache-sized) is built from
the inputs' rows — one small GEMM for a LoRA input —, sparsified, elected and averaged, scaled
by λ and added into the base rows.  Every step is elementwise or per row once the thresholds
are known and uses the ops of the whole-tensor ``generalized.merge`` in the same order, so the
result is bit-identical to it and independent of the blocking.

``ModelTrim`` is pass 1 of ``scope: global``: one selection per input over every tensor it
touches; ``ModelThresholds`` is its result, small enough to journal.

How a caller drives one tensor (``merge_by_blocks`` does it over in-memory updates)::

    form = method.rows                                   # None: whole-tensor merge only
    stats = form.statistics(name, shape, T, generator, params, given)
    for lo, hi in stats.sample_ranges():                 # optional first look
        stats.hint(updates restricted to rows lo:hi, weights)
    while stats.needs_pass():                            # 0 passes (DARE, Breadcrumbs), usually 1
        for each block (start a multiple of form.grid(shape)):
            stats.observe(RowBlock(name, shape, start, updates of the block's rows, weights))
        stats.end_pass()
    for each block:  form.merge_rows(RowBlock(...), stats, params, out=base_rows)  # W0 + ΔW rows
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from ..errors import MethodParameterError
from .base import DenseUpdate, LowRankUpdate, MergeInputs, RowBlock, RowMerge, TaskUpdate, at_input, divisor_weights
from .common import GRID_ELEMENTS, block_rows, row_count, row_grid
from .consensus import agreeing_mean, weight_sum
from .selection import HIGH_BINS, LOW_BINS, Threshold, TopKSelect, trim_rows, window_entries
from .sparsify import Band, RandomDrop, keep_count

__all__ = ["InputsMap", "TensorStatistics", "merge_rows", "supports_rows", "ModelTrim", "ModelThresholds",
           "merge_by_blocks", "sample_ranges", "MODEL_CANDIDATE_LIMIT", "working_bytes"]


SAMPLE_RANGES, SAMPLE_RUN = 16, 8
"""The first look of a tensor's magnitude selections (``TensorStatistics.hint``): 16 runs of 8 rows
spread over the tensor (few reads for a full fine-tune, and rows from every part of it)."""


def sample_ranges(shape: tuple[int, ...]) -> list[tuple[int, int]]:
    """Row ranges of a tensor of ``shape`` for a first look at its values: ``SAMPLE_RANGES`` runs spread over it."""
    total = row_count(shape)
    if total <= SAMPLE_RANGES * SAMPLE_RUN:
        return [(0, total)]
    return [(start, start + SAMPLE_RUN)
            for start in (i * (total - SAMPLE_RUN) // (SAMPLE_RANGES - 1) for i in range(SAMPLE_RANGES))]


def _steps(block: RowBlock) -> list[tuple[int, int]]:
    """The grid steps ``(lo, hi)`` of ``block``, relative to its first row."""
    step = row_grid(block.shape)
    assert block.start % step == 0, f"row block of {block.name!r} starts at {block.start}, off the {step}-row grid"
    return [(lo, min(lo + step, block.rows)) for lo in range(0, block.rows, step)]


def _device(block: RowBlock) -> torch.device:
    first = block.updates[0]
    return first.up.device if isinstance(first, LowRankUpdate) else first.delta.device


def _columns(shape: tuple[int, ...]) -> int:
    return shape[-1] if shape else 1


InputsMap = Callable[[Callable[[int], Any], Sequence[int]], Iterable[Any]]
"""How the passes run their inputs: ``map`` (in turn), or a thread pool's ``map``.  Pass 1: each input's
selection is its own state, fed its blocks in the same order either way; pass 2: each input's rows of a grid
step are built and sparsified apart, then combined in input order.  The result does not change."""


def _observe_trims(block: RowBlock, selects: Sequence[TopKSelect | None], keys: Sequence[str],
                   inputs_map: InputsMap = map) -> None:
    """Feed ``w_i ΔW_i`` of every grid step of ``block`` to the selections that still need a pass (they
    select by ``|x|`` and never write into the rows: a dense input's rows go in uncopied)."""
    wanted = [i for i, s in enumerate(selects) if s is not None and s.needs_pass()]
    columns = _columns(block.shape)
    steps = _steps(block)
    inference = torch.is_inference_mode_enabled()  # thread-local: a pool thread takes the caller's mode

    def feed(i: int) -> None:
        update, weight = block.updates[i], block.weights[i]
        with torch.inference_mode(inference):
            scratch = torch.empty((steps[0][1] - steps[0][0]) * columns, device=_device(block)) if steps else None
            for lo, hi in steps:
                if isinstance(update, DenseUpdate) and weight == 1.0:
                    rows = update.delta[lo:hi]
                else:
                    rows = block_rows(update, lo, hi, weight, scratch)
                selects[i].observe(keys[i], block.start + lo, rows.view(hi - lo, columns))  # type: ignore[union-attr]

    for _ in inputs_map(feed, wanted):
        pass


class TensorStatistics:
    """Pass-1 statistics of one tensor for a generalized variant (``BlockStatistics``).

    Args:
        sparsify: the variant's sparsifier kind (``none``, ``magnitude``, ``random``, ``band``).
        name: tensor name.
        shape: canonical shape.
        count: number of inputs of this tensor.
        generator: the tensor's seeded generator (DARE draws its per-input seeds from it, as
            ``merge`` does).
        params: resolved method parameters (``density`` / ``gamma`` one number, or a tuple per input).
        given: per-input thresholds of ``scope: global`` (``ModelThresholds.for_tensor``), or None.
    """

    def __init__(self, sparsify: str, name: str, shape: tuple[int, ...], count: int, generator: torch.Generator,
                 params: Mapping[str, Any], given: Sequence[Threshold] | None = None) -> None:
        self.sparsify = sparsify
        self.name = name
        self.shape = shape
        self.density = params.get("density", 1.0)
        self.gamma = params.get("gamma", 0.0)
        self.rescale = params.get("rescale", "density" if sparsify == "random" else "none")
        self.drop = RandomDrop(self.density, generator, count, self.rescale) if sparsify == "random" else None
        self.band = Band(self.density, self.gamma) if sparsify == "band" else None  # holds per-input scratch
        self.given = tuple(given) if given is not None else None
        self._steps: torch.Tensor | None = None  # pass 2's grid-step buffers, reused over the tensor's blocks
        self.inputs_map: InputsMap = map  # the engine may run pass 1's inputs on threads (``InputsMap``)
        self.selects: list[TopKSelect | None] = [None] * count
        if sparsify == "magnitude" and self.given is None:
            if params.get("scope", "tensor") != "tensor":
                raise MethodParameterError(
                    f"tensor {name!r}: scope {params['scope']!r} needs the whole-model thresholds "
                    f"(ModelTrim) of a first pass over every tensor; none were given")
            size = row_count(shape) * _columns(shape)
            self.selects = [TopKSelect(keep_count(at_input(self.density, i), size, params.get("min_keep", 0)),
                                       {name: row_count(shape)}, size)
                            for i in range(count)]

    def sample_ranges(self) -> list[tuple[int, int]]:
        """Row ranges whose values make a good first look (``hint``); empty when no selection is needed."""
        return sample_ranges(self.shape) if any(self.selects) else []

    def hint(self, updates: Sequence[TaskUpdate], weights: Sequence[float]) -> None:
        """A first look at one range of ``sample_ranges()`` of every input (``DenseUpdate`` of those rows or
        ``LowRankUpdate(up[rows], down)``), once per range: only how many passes pass 1 takes depends on it."""
        for select, update, weight in zip(self.selects, updates, weights):
            if select is not None:
                dense = update.dense() if isinstance(update, LowRankUpdate) else update.delta
                select.hint((dense * weight).abs())

    def needs_pass(self) -> bool:
        return any(s is not None and s.needs_pass() for s in self.selects)

    def observe(self, block: RowBlock) -> None:
        _observe_trims(block, self.selects, [self.name] * len(self.selects), self.inputs_map)

    def end_pass(self) -> None:
        for select in self.selects:
            if select is not None and select.needs_pass():
                select.end_pass()

    def step_buffers(self, count: int, entries: int, device: torch.device) -> torch.Tensor:
        """``[count, entries]`` fp32 scratch for pass 2's grid steps (the same one for every block of the tensor:
        a fresh tensor per step and input costs page faults and cache misses)."""
        held = self._steps
        if held is None or held.shape[0] < count or held.shape[1] < entries or held.device != device:
            held = self._steps = torch.empty(count, entries, device=device)
        return held

    def thresholds(self) -> tuple[Threshold, ...]:
        """Each input's magnitude threshold (after the last pass)."""
        if self.given is not None:
            return self.given
        return tuple(s.threshold(self.name) for s in self.selects if s is not None)


def _sparsify_rows(stats: TensorStatistics, thresholds: Sequence[Threshold], rows: torch.Tensor, index: int,
                   first_row: int) -> torch.Tensor:
    """Input ``index``'s rows after its sparsifier, in place (the ops of ``sparsify``'s classes)."""
    if stats.sparsify == "magnitude":
        return trim_rows(rows, first_row, thresholds[index])
    if stats.sparsify == "random":
        assert stats.drop is not None
        flat = first_row * rows.shape[-1]
        mask = stats.drop.mask_range(index, flat, flat + rows.numel(), reuse=True).view(rows.shape)
        rows = rows.mul_(mask)
        return rows.div_(at_input(stats.density, index)) if stats.rescale == "density" else rows
    if stats.sparsify == "band":
        assert stats.band is not None
        low, high = stats.band.bounds(rows, index)
        return stats.band.keep(rows, low, high, index)
    return rows


def _combine_rows(terms: list[torch.Tensor], elect: bool, normalize: str, weights: Sequence[float],
                  scratch: torch.Tensor) -> torch.Tensor:
    """``consensus.combine`` on rows held at once: the same ops, in the same order (``scratch``: two buffers
    of a term's size, for the elected sign and the agreement count)."""
    total = terms[0] if not elect else scratch[0].view_as(terms[0]).copy_(terms[0])
    for term in terms[1:]:
        total.add_(term)
    if not elect:
        return total.div_(weight_sum(weights, total.device)) if normalize == "weights" else total
    sign = torch.copysign(torch.ones((), device=total.device), total, out=total)
    return agreeing_mean(terms, sign, normalize, weights, mark=scratch[1])


def _step_rows(update: TaskUpdate, lo: int, hi: int, weight: float, out: torch.Tensor) -> torch.Tensor:
    """``block_rows`` written into ``out`` (a step buffer) for a dense input too: the sparsifiers overwrite it."""
    if isinstance(update, LowRankUpdate):
        return block_rows(update, lo, hi, weight, out)
    rows = update.delta[lo:hi]
    target = out[:rows.numel()].view(rows.shape)
    return target.copy_(rows) if weight == 1.0 else torch.mul(rows, weight, out=target)


def merge_rows(block: RowBlock, stats: TensorStatistics, params: Mapping[str, Any], out: torch.Tensor | None,
               elect: bool) -> torch.Tensor:
    """Pass 2: the merged update of ``block``'s rows (``[rows, d_in]``), added into ``out`` when given."""
    columns = _columns(block.shape)
    thresholds = stats.thresholds() if stats.sparsify == "magnitude" else ()
    scale = params["lambda"]
    normalize, weights = divisor_weights(params, block.weights)
    normalize = params.get("normalize", "count") if elect else normalize
    result = out if out is not None else torch.empty(block.rows, columns, device=_device(block))
    target = result.view(block.rows, columns)
    steps = _steps(block)
    count = len(block.updates)
    buffers = stats.step_buffers(count + 2, (steps[0][1] - steps[0][0]) * columns, _device(block)) if steps else None
    inference = torch.is_inference_mode_enabled()  # thread-local: a pool thread takes the caller's mode

    def term(i: int, lo: int, hi: int) -> torch.Tensor:
        assert buffers is not None
        with torch.inference_mode(inference):
            rows = _step_rows(block.updates[i], lo, hi, block.weights[i], buffers[i]).view(hi - lo, columns)
            return _sparsify_rows(stats, thresholds, rows, i, block.start + lo)

    for lo, hi in steps:
        assert buffers is not None
        terms = list(stats.inputs_map(partial(term, lo=lo, hi=hi), range(count)))
        merged = _combine_rows(terms, elect, normalize, weights,
                               buffers[count:count + 2, :terms[0].numel()]).mul_(scale)
        if out is not None:
            target[lo:hi].add_(merged)
        else:
            target[lo:hi] = merged
        del terms, merged
    return result


STEP_BYTES = 3 * 4 * GRID_ELEMENTS
"""Per input, the grid-step temporaries (its rows, a trim's two shrunk copies or the band's int32 scratch) and
histograms or a mask chunk."""


def working_bytes(sparsify: str, shape: tuple[int, ...], count: int, params: Mapping[str, Any]) -> int:
    """What the statistics and grid steps of ``count`` inputs hold for a tensor of ``shape``, beyond its row
    blocks: per input the grid-step temporaries and, for a per-tensor magnitude trim, the entries the window
    pass keeps (``selection.window_entries``, 8 bytes each, doubled while they are joined at the end)."""
    held = count * (STEP_BYTES + 3 * (HIGH_BINS + LOW_BINS))
    if sparsify == "magnitude" and params.get("scope", "tensor") == "tensor":
        held += count * 16 * window_entries(row_count(shape) * _columns(shape))
    return held


def supports_rows(params: Mapping[str, Any]) -> bool:
    """Row blocks cover the plain variants; DO-Merging's components need whole factors / row norms,
    ``lambda: auto`` the norm of the whole merged update.  mergekit's ``rescale: l1`` needs each
    input's L1 norm before and after sparsifying (fp32 sums whose rounding would depend on the
    blocking) and ``band: tensor`` two exact selections over the whole flattened tensor with an
    inclusive band that ``TopKSelect``'s exact-count thresholds do not express: both run whole-tensor."""
    return (not params.get("orthogonalize", False) and not params.get("decouple", False)
            and params.get("lambda") != "auto" and params.get("rescale") != "l1" and params.get("band") != "tensor")


@dataclass(frozen=True)
class ModelThresholds:
    """Per input, the threshold of every tensor it touches (``scope: global``'s pass-1 result).

    ``record()`` is plain JSON-able data for the journal; ``from_record`` reads it back.
    """

    inputs: tuple[Mapping[str, Threshold], ...]

    def for_tensor(self, name: str, inputs: Sequence[int]) -> tuple[Threshold, ...]:
        """The thresholds of tensor ``name`` for its inputs ``inputs`` (model-wide indices), in order."""
        return tuple(self.inputs[i][name] for i in inputs)

    def record(self) -> list[dict[str, list[float]]]:
        return [{name: [t.value, t.tie_row, t.tie_quota] for name, t in per.items()} for per in self.inputs]

    @classmethod
    def from_record(cls, record: Sequence[Mapping[str, Sequence[float]]]) -> ModelThresholds:
        return cls(tuple({name: Threshold(float(v[0]), int(v[1]), int(v[2])) for name, v in per.items()}
                         for per in record))


MODEL_CANDIDATE_LIMIT = 1 << 23
"""Entries the window pass of a whole-model selection may keep per input (8 bytes each: 64 MiB)."""


class ModelTrim:
    """Pass 1 of ``scope: global``: each input keeps its top ``density`` over every tensor it touches.

    Args:
        density: fraction kept per input over the whole model.
        tensors: per input (model-wide order), its tensors in tie-breaking order (the plan's),
            name → canonical shape.
        candidate_limit: entries each input's window pass may keep.
    """

    def __init__(self, density: float, tensors: Sequence[Mapping[str, tuple[int, ...]]],
                 candidate_limit: int = MODEL_CANDIDATE_LIMIT) -> None:
        sizes = [sum(row_count(s) * _columns(s) for s in per.values()) for per in tensors]
        self.selects = [TopKSelect(keep_count(density, size), {name: row_count(s) for name, s in per.items()}, size,
                                   candidate_limit) for per, size in zip(tensors, sizes)]

    def needs_pass(self) -> bool:
        return any(s.needs_pass() for s in self.selects)

    def hint(self, name: str, shape: tuple[int, ...], updates: Sequence[TaskUpdate], weights: Sequence[float],
             inputs: Sequence[int]) -> None:
        """A first look at a few rows of tensor ``name`` (e.g. ``TensorStatistics.sample_ranges``) for its
        inputs ``inputs``; call it for every tensor before pass 1, so that pass 1 usually suffices."""
        size = row_count(shape) * _columns(shape)
        for i, update, weight in zip(inputs, updates, weights):
            dense = update.dense() if isinstance(update, LowRankUpdate) else update.delta
            self.selects[i].hint((dense * weight).abs(), represents=size)

    def observe(self, block: RowBlock) -> None:
        """Feed one row block of one tensor (``block.inputs``: model-wide input indices)."""
        ids = block.inputs if block.inputs is not None else tuple(range(len(block.updates)))
        _observe_trims(block, [self.selects[i] for i in ids], [block.name] * len(ids))

    def end_pass(self) -> None:
        for select in self.selects:
            if select.needs_pass():
                select.end_pass()

    def result(self) -> ModelThresholds:
        return ModelThresholds(tuple({name: s.threshold(name) for name in s.rows} for s in self.selects))


def _block_of(update: TaskUpdate, start: int, stop: int, columns: int) -> TaskUpdate:
    if isinstance(update, LowRankUpdate):
        return LowRankUpdate(up=update.up[start:stop], down=update.down)
    return DenseUpdate(update.delta.reshape(-1, columns)[start:stop])


def merge_by_blocks(form: RowMerge, inputs: MergeInputs, params: Mapping[str, Any], block_rows: int,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """The two-pass protocol over in-memory updates, ``block_rows`` rows at a time (a multiple of the grid).

    This is what the engine does with rows read from files: pass 1 until the statistics need
    no further pass, then pass 2 block by block.  Returns the merged update as ``[rows, d_in]``
    (added into ``out``, the base rows, when given).
    """
    shape = tuple(inputs.base.shape)
    total, columns = row_count(shape), _columns(shape)
    assert block_rows % form.grid(shape) == 0, "blocks must be a multiple of the grid"

    def blocks() -> Iterator[RowBlock]:
        for start in range(0, total, block_rows):
            stop = min(start + block_rows, total)
            updates = tuple(_block_of(u, start, stop, columns) for u in inputs.updates)
            yield RowBlock(inputs.name, shape, start, updates, inputs.weights)

    stats = form.statistics(inputs.name, shape, len(inputs.updates), inputs.generator, params, inputs.statistics)
    for lo, hi in stats.sample_ranges():
        stats.hint(tuple(_block_of(u, lo, hi, columns) for u in inputs.updates), inputs.weights)
    while stats.needs_pass():
        for block in blocks():
            stats.observe(block)
        stats.end_pass()
    target = out.view(total, columns) if out is not None else torch.empty(total, columns, device=inputs.base.device)
    for block in blocks():
        rows = target[block.start:block.start + block.rows]
        if out is not None:
            form.merge_rows(block, stats, params, rows)
        else:
            rows.copy_(form.merge_rows(block, stats, params, None))
    return target
