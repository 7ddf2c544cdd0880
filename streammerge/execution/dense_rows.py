"""The worker's row-block paths: elementwise methods, and dense methods in two passes (``rows`` forms).

A tensor that a method cannot merge from factors alone (a full fine-tune, DoRA, TIES / DARE /
Breadcrumbs / magnitude prune) is merged here row block by row block, never as whole fp32 tensors:
an elementwise method (Task Arithmetic, linear) in one pass; a dense method's row form in two, the
first feeding its statistics (exact top-k thresholds), the second merging each block into the base
rows.  ``TensorMerger`` (``worker.py``) takes these paths as a mixin: they use its loaders, base
rows and unload.  The same module gives the helpers both share: contributions grouped by input,
one input's update from its parts, a job's per-input params, the row blocks of a shape.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from ..errors import AdapterError
from ..inputs.kinds import KINDS, REPLACEMENT, TaskPart
from ..jobs.faults import kill_point
from ..methods import DenseUpdate, LowRankUpdate, MergeInputs, TaskUpdate
from ..methods.base import RowBlock
from ..methods.common import gridded_dense
from ..methods.rows import InputsMap, ModelTrim, sample_ranges
from ..methods.sparsify import as_rows
from ..planning.budget import rows_per_block, streams_method_rows
from ..planning.plan import TensorJob, tensor_seed
from ..planning.tensor_jobs import Contribution
from .staging import Pending

__all__ = ["DenseRowPaths", "RowSource", "combine_parts", "contributions_by_input", "job_params", "row_blocks"]


def row_blocks(shape: tuple[int, ...], align: int = 1) -> Iterator[tuple[int, int]]:
    """Row ranges of a tensor whose fp32 blocks stay near ``budget.BLOCK_BYTES`` (at least one row), each
    starting on a multiple of ``align`` rows (an FP8 weight's scale blocks)."""
    if not shape:
        yield 0, 1
        return
    rows = shape[0]
    step = max(align, rows_per_block(shape) // align * align)
    for start in range(0, rows, step):
        yield start, min(rows, start + step)
    if rows == 0:
        yield 0, 0


@dataclass(frozen=True)
class RowSource:
    """How a dense method's row form reads one tensor: ``updates(start, stop, base)`` gives each input's rows
    (``base``: the base rows when the caller read them already, else None)."""

    updates: Callable[[int, int, torch.Tensor | None], tuple[TaskUpdate, ...]]
    weights: tuple[float, ...]
    blocks: list[tuple[int, int]]


def contributions_by_input(job: TensorJob) -> dict[int, list[Contribution]]:
    """``job``'s contributions grouped by input, in the order the plan lists them (an input may bring several)."""
    by_input: dict[int, list[Contribution]] = {}
    for c in job.contributions:
        by_input.setdefault(c.input_index, []).append(c)
    return by_input


def combine_parts(parts: list[TaskPart]) -> TaskUpdate | None:
    """One input's task update from its contributions' parts: factors alone stay low-rank."""
    dense: torch.Tensor | None = None
    low_rank: LowRankUpdate | None = None
    for part in parts:
        if part.up is not None and part.down is not None:
            low_rank = LowRankUpdate(up=part.up, down=part.down)
        elif part.delta is not None:
            dense = part.delta if dense is None else dense.add_(part.delta)
    if dense is None:
        return low_rank
    if low_rank is not None:
        dense = dense.add_(low_rank.dense())
    return DenseUpdate(dense)


def job_params(params: dict[str, Any], job: TensorJob, indices: Sequence[int]) -> dict[str, Any]:
    """The method's params for ``job``: the plan's, the job's own (``all_weights``) and each input's per-input
    values (``Contribution.params``): one number where the inputs ``indices`` agree, else a tuple aligned with them."""
    if not job.params and not any(c.params for c in job.contributions):
        return params
    result = {**params, **dict(job.params)}
    own = {i: dict(cs[0].params) for i, cs in contributions_by_input(job).items()}
    for name in sorted({n for values in own.values() for n in values}):
        values = tuple(own.get(i, {}).get(name, params[name]) for i in indices)
        if values:
            result[name] = values[0] if len(set(values)) == 1 else values
    return result


class DenseRowPaths:
    """The row-block paths of ``TensorMerger`` (a mixin).  They use the merger's attributes below and its
    ``device_for``, ``_loader``, ``_fetch_rows``, ``_load_rows``, ``_base_rows``, ``_row_blocks``, ``_unload``,
    ``_merged_rows``, ``_whole_updates`` and ``_given``."""

    plan: Any
    method: Any
    params: dict[str, Any]
    device: torch.device
    readers: Any
    check_finite: bool
    model_statistics: Any
    _pass_pool: ThreadPoolExecutor | None

    def _elementwise_blocks(self, job: TensorJob) -> Iterator[Pending]:
        """Merge an elementwise method one row block at a time: base rows, each input's rows, merge, cast.

        A full fine-tune of a 128k-row embedding then needs a few 64 MiB blocks instead of a whole
        fp32 base, a whole fp32 delta per input and the result.  Every input's delta enters every
        block, also where it is zero: the method is elementwise, so the result does not depend on
        the blocking.
        """
        self.device = self.device_for(job)
        by_input = contributions_by_input(job)
        preloaded = {id(c): KINDS[c.kind].preload(c, self._loader(c.kind))  # type: ignore[misc]
                     for c in job.contributions
                     if KINDS[c.kind].preload is not None}
        weights = tuple(contribs[0].weight for contribs in by_input.values())
        params = job_params(self.params, job, list(by_input))
        generator = torch.Generator(device=self.device)  # unused: elementwise methods draw nothing
        for start, stop in self._row_blocks(job):
            base = self._base_rows(job, start, stop)
            updates = []
            for contribs in by_input.values():
                parts = [KINDS[c.kind].rows(c, self._load_rows, base, start, stop, preloaded.get(id(c)))
                         for c in contribs]
                update = combine_parts(parts)
                assert update is not None  # every input has a contribution here
                updates.append(update)
            result = self.method.merge(MergeInputs(job.name, base, tuple(updates), weights, generator), params)
            update = result.update
            if (self.check_finite and isinstance(update, DenseUpdate)
                    and not math.isfinite(float(update.delta.sum()))):
                self._refuse_non_finite_rows(job, start, stop)
            if isinstance(update, LowRankUpdate):
                base.addmm_(update.up, update.down)
            else:
                base.add_(update.delta)
            yield self._unload(job, base, start)
            del base, updates, result, update

    def _block_updates(self, job: TensorJob, by_input: dict[int, list[Contribution]], preloaded: dict[int, Any],
                       base: torch.Tensor, start: int, stop: int) -> tuple[TaskUpdate, ...]:
        """Each input's update restricted to rows ``start:stop`` (LoRA: its ``up`` rows, no dense delta).

        Stored rows are read into reused work buffers, one per contribution (slot 0 is the base's): a fresh
        64 MiB block per input and pass costs more in page faults than its conversion.  The updates are
        valid until the next call.
        """
        updates = []
        slots = {id(c): 1 + k for k, c in enumerate(c for cs in by_input.values() for c in cs)}
        for contribs in by_input.values():
            parts = [KINDS[c.kind].rows(c, partial(self._fetch_rows, work=True, slot=slots[id(c)]), base, start,
                                        stop, preloaded.get(id(c))) for c in contribs]
            dense = [p.delta for p in parts if p.delta is not None]
            low = [LowRankUpdate(up=p.up, down=p.down) for p in parts if p.up is not None and p.down is not None]
            if not dense:
                updates.append(low[0] if low else DenseUpdate(torch.zeros_like(base)))
                continue
            total = dense[0]
            for d in dense[1:]:
                total = total.add_(d)
            for update in low:  # a dense and a low-rank part of one input: the GEMM on the method's row grid
                total = total.add_(gridded_dense(update))
            updates.append(DenseUpdate(total))
        return tuple(updates)

    def _row_inputs(self, job: TensorJob) -> tuple[dict[int, list[Contribution]], RowSource | None]:
        """``job``'s inputs for a dense method's row form, and what reads their rows (None: no input).

        An input whose saved tensor equals the base (PEFT saves unchanged embedding layers) is left
        out first, as the whole-tensor path does.
        """
        self.device = self.device_for(job)
        by_input = {i: cs for i, cs in contributions_by_input(job).items() if not self._equals_base(job, cs)}
        if not by_input:
            return by_input, None
        preloaded = {id(c): KINDS[c.kind].preload(c, self._loader(c.kind))  # type: ignore[misc]
                     for cs in by_input.values() for c in cs if KINDS[c.kind].preload is not None}
        needs_base = any(KINDS[c.kind].needs_base_values for cs in by_input.values() for c in cs)
        zeros = torch.zeros((), device=self.device)

        def updates_of(start: int, stop: int, base: torch.Tensor | None = None) -> tuple[TaskUpdate, ...]:
            if base is None:
                base = (self._base_rows(job, start, stop, work=True) if needs_base
                        else zeros.expand(stop - start, *job.shape[1:]))
            return self._block_updates(job, by_input, preloaded, base, start, stop)

        form = self.method.rows
        assert form is not None
        fmt = self.plan.fp8
        align = math.lcm(form.grid(job.shape), fmt.block_rows if job.scale and fmt is not None else 1)
        return by_input, RowSource(updates_of, tuple(cs[0].weight for cs in by_input.values()),
                                   list(row_blocks(job.shape, align)))

    def _two_pass_blocks(self, job: TensorJob) -> Iterator[Pending]:
        """A dense method (TIES, DARE, Breadcrumbs, magnitude prune) over row blocks, never whole fp32 tensors.

        Pass 1 feeds every block to the method's statistics (each input's exact top-k threshold; none
        for DARE and Breadcrumbs, nor under ``scope: global``, whose thresholds come from the
        whole-model pass) until they are final; pass 2 merges each block into the base rows.  Blocks
        start on the method's row grid, so the bytes equal the whole-tensor merge's whatever the block size.

        On the CPU the method's ops run on one intra-op thread: they work on cache-sized grid steps (1 MiB),
        where splitting each op over threads costs more in fork/join than it saves (measured on 2 cores: the
        same CPU time quiet, several times more under load).  Instead both passes run their inputs on a pool
        of as many threads (``rows.InputsMap``: each input's selection is independent and fed its blocks in
        order, each input's rows of a pass-2 grid step are combined in input order: the same result).
        """
        serial = self.device_for(job).type == "cpu" and torch.get_num_threads() > 1
        threads = torch.get_num_threads()
        if serial:
            torch.set_num_threads(1)
            if self._pass_pool is None:
                self._pass_pool = ThreadPoolExecutor(threads, thread_name_prefix="streammerge-pass1")
        try:
            yield from self._two_passes(job, self._pass_pool.map if serial and self._pass_pool else map)
        finally:
            if serial:
                torch.set_num_threads(threads)

    def _two_passes(self, job: TensorJob, inputs_map: InputsMap) -> Iterator[Pending]:
        form = self.method.rows
        assert form is not None
        by_input, source = self._row_inputs(job)
        if source is None:
            yield from self._merged_rows(job, None, False, None)
            return
        generator = torch.Generator(device=self.device)
        generator.manual_seed(tensor_seed(self.plan.recipe.seed, job.name))
        params = job_params(self.params, job, list(by_input))
        stats = form.statistics(job.name, job.shape, len(by_input), generator, params,
                                self._given(job, by_input))
        if hasattr(stats, "inputs_map"):  # the inputs on the pool's threads (torch ops release the GIL)
            stats.inputs_map = inputs_map
        for start, stop in stats.sample_ranges():  # a first look: pass 1 then usually suffices
            stats.hint(source.updates(start, stop), source.weights)
        while stats.needs_pass():
            for start, stop in source.blocks:
                stats.observe(RowBlock(job.name, job.shape, start, source.updates(start, stop), source.weights))
            stats.end_pass()
        for start, stop in source.blocks:
            base = self._base_rows(job, start, stop, work=True)  # merged in place: the output rows
            updates = source.updates(start, stop, base)  # dense inputs' deltas from the same base rows
            merged = form.merge_rows(RowBlock(job.name, job.shape, start, updates, source.weights), stats,
                                     params, base)
            if self.check_finite and not math.isfinite(float(merged.sum())):
                self._refuse_non_finite_rows(job, start, stop)
            kill_point("rows")
            yield self._unload(job, merged, start)
            del base, updates, merged

    def model_segments(self, job: TensorJob) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """For the whole-model pass (``scope: global``): the inputs that change ``job`` and its canonical shape."""
        if streams_method_rows(job, self.method, self.params):
            return tuple(self._row_inputs(job)[0]), job.shape
        transposed = any(c.transposed for c in job.contributions)
        return tuple(contributions_by_input(job)), tuple(reversed(job.shape)) if transposed else job.shape

    def feed_model_pass(self, trim: ModelTrim, job: TensorJob, first_look: bool) -> None:
        """Feed ``job``'s task vectors to the whole-model selection: a first look (a few rows) or one pass."""
        if streams_method_rows(job, self.method, self.params):
            by_input, source = self._row_inputs(job)
            if source is None:
                return
            ids, shape = tuple(by_input), job.shape
            if first_look:
                for start, stop in sample_ranges(shape):
                    trim.hint(job.name, shape, source.updates(start, stop), source.weights, ids)
                return
            for start, stop in source.blocks:
                trim.observe(RowBlock(job.name, shape, start, source.updates(start, stop), source.weights, ids))
            return
        base, updates, _, inputs, transposed = self._whole_updates(job)
        found = dict(zip(inputs, updates))  # an input whose tensor equals the base: zeros, counted all the same
        ids = tuple(contributions_by_input(job))
        shape = tuple(reversed(job.shape)) if transposed else job.shape
        rows = tuple(DenseUpdate(as_rows(found[i].dense() if i in found else torch.zeros(shape, device=self.device)))
                     for i in ids)
        weights = tuple(cs[0].weight for cs in contributions_by_input(job).values())
        if first_look:
            trim.hint(job.name, shape, rows, weights, ids)
        else:
            trim.observe(RowBlock(job.name, shape, 0, rows, weights, ids))

    def _equals_base(self, job: TensorJob, contribs: list[Contribution]) -> bool:
        """An input made only of replacement tensors byte-identical to the base changes nothing."""
        if not all(c.kind == REPLACEMENT.name for c in contribs):
            return False
        base = self.readers.get(job.source_file).read(job.source)
        return all(torch.equal(self.readers.get(c.file).read(c.keys[0]), base) for c in contribs)

    def _refuse_non_finite_rows(self, job: TensorJob, start: int, stop: int) -> None:
        """The merged delta of rows ``start:stop`` is not finite: name the whole-tensor input that is NaN / Inf.

        One sum over the merged delta replaces an ``isfinite`` pass over every input (NaN and Inf
        propagate through it); only when it is not finite are the inputs' rows checked one by one.
        A finite sum that overflowed finds no culprit and the merge goes on.
        """
        for c in job.contributions:
            if not KINDS[c.kind].whole_tensor:
                continue  # factors and biases were checked whole when loaded / before the job
            rows = self.readers.get(c.file).read_rows(c.keys[0], start, stop, torch.float32)
            if not bool(torch.isfinite(rows).all()):
                raise AdapterError(f"tensor {c.keys[0]!r} in {c.file!r} holds NaN or Inf values; the input is corrupt")
