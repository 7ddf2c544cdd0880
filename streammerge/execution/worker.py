"""The device worker: merges one ``TensorJob`` with the plan's method and hands back row blocks.

The worker reads what a tensor's contributions need (through the input-kinds table), calls the
method on canonical ``[d_out, d_in]`` updates, and streams ``W0 + ΔW`` back in fixed row blocks,
in the stored orientation and output dtype, on the CPU.  It never knows which output format the
blocks go to: sinks call ``merged_blocks`` (a full tensor) or ``merge_update`` (the update alone).
Tensors merged row block by row block (elementwise methods over dense inputs, the dense methods'
two passes) take the paths in ``dense_rows.py``; methods with ``merge_many`` merge windows of
tensors ahead (``lookahead.py``).
"""

from __future__ import annotations

import itertools
from contextlib import nullcontext
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import torch

from ..errors import AdapterError, OutputError
from ..inputs.kinds import KINDS
from ..io.dtypes import DTYPES
from ..inputs.base_formats import open_reader
from ..io.fp8 import FP8_DTYPE, dequantize_rows, quantize_rows
from ..io.reader import CheckpointReader
from ..methods import DenseUpdate, LowRankUpdate, MergeInputs, MergeResult, TaskUpdate, get_method
from ..methods.low_precision import load_dtype
from ..methods.rows import ModelThresholds
from ..planning.budget import LOOKAHEAD_BYTES, streams_dense_rows, streams_method_rows, tensor_working_set
from ..planning.plan import MergePlan, TensorJob, tensor_seed
from .dense_rows import DenseRowPaths, combine_parts, contributions_by_input, job_params, row_blocks
from .lookahead import Lookahead
from .staging import Pending, Staging

__all__ = ["Readers", "TensorMerger", "resolve_device", "row_blocks", "tensor_seed"]

# Stored tensors kept by the worker for kinds whose tensors feed many output tensors (MoE expert factors).
SHARED_TENSORS_KEPT = 4


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise OutputError("--device cuda was requested but torch sees no CUDA device; use --device auto or cpu")
    return torch.device(name)


class Readers:
    """One lazily opened reader per input file."""

    def __init__(self) -> None:
        self._readers: dict[str, CheckpointReader] = {}

    def get(self, file: str) -> CheckpointReader:
        reader = self._readers.get(file)
        if reader is None:
            # A file of a model opened already (a split GGUF opens all its files) shares that reader.
            reader = next((r for r in self._readers.values() if Path(file) in r.layout.shards), None)
            reader = reader or open_reader(file)
            self._readers[file] = reader
        return reader

    def close(self) -> None:
        for reader in set(self._readers.values()):
            reader.close()
        self._readers.clear()


class TensorMerger(DenseRowPaths):
    """The device worker: merges one ``TensorJob`` with the plan's method."""

    def __init__(self, plan: MergePlan, device: torch.device, readers: Readers, *, check_finite: bool = True,
                 background: bool = True) -> None:
        self.plan = plan
        self.main_device = device
        self.device = device  # the device of the tensor being merged (see device_for)
        self.readers = readers
        self.check_finite = check_finite  # refuse input tensors holding NaN / Inf
        # background: the next merge_many window runs on a thread while this one is written (same results)
        self.method = get_method(plan.recipe.method)
        self.params = dict(plan.method_params)
        # load_dtype / compute_dtype bf16 / fp16 (a mergekit config's dtype): every model tensor is rounded to it on
        # load and the merged one before the cast to the output dtype, as mergekit loads in dtype and returns dtype
        # tensors
        self.narrow = load_dtype(self.params)
        self._shared: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()
        self._fresh_scales: dict[str, list[torch.Tensor]] = {}
        """FP8 output: ``{weight_scale_inv name: its rows}`` computed while the weight was requantized."""
        self.model_statistics: ModelThresholds | None = None  # scope: global, from the whole-model pass
        self._stagings: dict[torch.device, Staging] = {}
        self._ahead = Lookahead(background)
        self._pass_pool: ThreadPoolExecutor | None = None  # the dense row form's inputs, one per thread

    def device_for(self, job: TensorJob) -> torch.device:
        """The worker device, or the CPU for a tensor whose working set exceeds --max-gpu-memory."""
        limit = self.plan.recipe.max_gpu_memory
        if self.main_device.type != "cpu" and limit is not None:
            if tensor_working_set(job, self.method, self.params)[0] > limit:
                return torch.device("cpu")
        return self.main_device

    def _staging(self) -> Staging:
        """The transfers of the device the current tensor merges on (one per device: the CPU fallback has its own)."""
        staging = self._stagings.get(self.device)
        if staging is None:
            staging = self._stagings[self.device] = Staging(self.device)
        return staging

    def _fetch_rows(self, file: str, key: str, start: int = 0, stop: int | None = None,
                    work: bool = False, slot: int = 0, rounded: bool = True) -> torch.Tensor:
        """fp32 rows (the whole tensor when ``stop`` is None) on the worker device.

        The stored bytes (bf16 / fp16 / fp8: half the bytes of fp32 or less) go to the device as
        they are and are converted there (``Staging.load``); on the CPU that is one conversion
        straight from the memory map.  ``work``: into the reused row-block work buffer ``slot``.  ``rounded``: to
        a narrow load / compute dtype (mergekit loads every model tensor in its ``dtype``; LoRA factors are not).
        """
        with self.readers.get(file).stored_rows(key, start, stop) as stored:
            rows = self._staging().load(stored, work, slot)
            narrow = self.narrow
            if rounded and narrow is not None and stored.is_floating_point() and stored.itemsize > narrow.itemsize:
                rows.copy_(rows.to(narrow))
            return rows

    def _load(self, file: str, key: str, check: bool = True, rounded: bool = True) -> torch.Tensor:
        tensor = self._fetch_rows(file, key, rounded=rounded)
        if check and self.check_finite and not bool(torch.isfinite(tensor).all()):
            raise AdapterError(f"tensor {key!r} in {file!r} holds NaN or Inf values; the input is corrupt")
        return tensor

    def _load_shared(self, file: str, key: str, check: bool = True, rounded: bool = True) -> torch.Tensor:
        """``_load`` for tensors many output tensors read (``InputKind.shared_tensors``): the last few are kept."""
        tensor = self._shared.pop((file, key), None)
        if tensor is None or tensor.device != self.device:
            tensor = self._load(file, key, check, rounded)
        self._shared[(file, key)] = tensor
        while len(self._shared) > SHARED_TENSORS_KEPT:
            self._shared.popitem(last=False)
        return tensor

    def _loader(self, kind: str) -> Callable[[str, str], torch.Tensor]:
        """How a kind's tensors are loaded.  Small adapter tensors were checked for NaN / Inf before the job
        (``jobs.preflight``, rank 0 of a distributed job): they are not checked a second time here."""
        load = self._load_shared if KINDS[kind].shared_tensors else self._load
        # LoRA factors stay as stored: PEFT's merge in mergekit adds their fp32 product to W0, then rounds
        rounded = not KINDS[kind].low_rank
        if KINDS[kind].checked_before_job:
            return partial(load, check=False, rounded=rounded)
        return partial(load, rounded=rounded)

    def _load_rows(self, file: str, key: str, start: int, stop: int) -> torch.Tensor:
        return self._fetch_rows(file, key, start, stop)

    def _base(self, job: TensorJob, canonical_shape: tuple[int, ...], transposed: bool,
              needs_values: bool) -> torch.Tensor:
        """The base in canonical orientation: real values, or a zero-stride placeholder of the right shape."""
        if not needs_values:
            return torch.zeros((), device=self.device).expand(canonical_shape)
        base = self._base_rows(job, 0, job.shape[0]) if job.scale else self._fetch_rows(job.source_file, job.source)
        return base.T if transposed else base

    def _base_rows(self, job: TensorJob, start: int, stop: int, work: bool = False) -> torch.Tensor:
        """Rows ``start:stop`` of the base tensor in fp32 (an FP8 weight dequantized with its block scales);
        ``work``: in the reused work buffer, valid until the next such call."""
        rows = self._fetch_rows(job.source_file, job.source, start, stop, work)
        fmt = self.plan.fp8
        if not job.scale or fmt is None:
            return rows
        scale = self.readers.get(job.scale_file).read_rows(job.scale, start // fmt.block_rows,
                                                           -(-stop // fmt.block_rows)).to(self.device)
        return dequantize_rows(rows, scale, start, fmt)

    def _row_blocks(self, job: TensorJob) -> Iterator[tuple[int, int]]:
        """The job's row blocks; an FP8 weight's start on its scale blocks' grid."""
        fmt = self.plan.fp8
        return row_blocks(job.shape, fmt.block_rows if job.scale and fmt is not None else 1)

    def merged_blocks(self, job: TensorJob) -> tuple[Iterator[torch.Tensor], dict[str, float]]:
        """The merged tensor as row blocks (stored orientation, output dtype, CPU), and method stats.

        The method sees factors only; the base is streamed through ``W0[rows] + L[rows] @ R``
        block by block, so a tensor never needs more than its factors, one fp32 row block and
        its cast copy — unless the method or a dense input needs the base values.  A fresh FP8
        scale (``job.scale_of``) is the grid computed while its weight's blocks were taken.
        """
        if job.scale_of:
            return self._fresh_scale_blocks(job), {}
        if streams_dense_rows(job, self.method):
            return self._host_blocks(self._elementwise_blocks(job)), {}
        if streams_method_rows(job, self.method, self.params):
            return self._host_blocks(self._two_pass_blocks(job)), {}
        result, base, transposed = self.merge_update(job)
        update = result.update if result is not None else None
        stats = result.stats if result is not None else {}
        return self._blocks(job, base, transposed, update), stats

    def _requantizes(self, job: TensorJob) -> bool:
        """Whether ``job`` is an FP8 weight written as FP8 again (requantized on its scale grid)."""
        return bool(job.scale) and self.plan.fp8 is not None and DTYPES[job.out_dtype].torch_dtype == FP8_DTYPE

    def _host_blocks(self, pending: Iterator[Pending]) -> Iterator[torch.Tensor]:
        """The host blocks of a generator of ``Pending`` ones (it sets ``self.device`` before its first block)."""
        first = next(pending, None)
        if first is None:
            return
        yield from self._staging().host_blocks(itertools.chain([first], pending))

    def _unload(self, job: TensorJob, block: torch.Tensor, start: int) -> Pending:
        """A merged fp32 row block in the output dtype, into a host buffer (``Staging.unload``).  FP8 output:
        requantized on the base's scale grid (``start`` is on it), its fresh scale rows kept for
        ``job.scale``'s own job, which follows."""
        fmt = self.plan.fp8
        out = DTYPES[job.out_dtype].torch_dtype
        if self.narrow is not None and out != self.narrow:
            block = block.copy_(block.to(self.narrow))
        if fmt is None or not self._requantizes(job):
            return self._staging().unload(block, out)
        scale_dtype = DTYPES[self.readers.get(job.scale_file).layout.info(job.scale).dtype].torch_dtype
        quantized, scale = quantize_rows(block, start, fmt, scale_dtype)
        self._fresh_scales.setdefault(job.scale, []).append(scale.cpu())
        return Pending(quantized.contiguous().cpu())

    def _fresh_scale_blocks(self, job: TensorJob) -> Iterator[torch.Tensor]:
        rows = self._fresh_scales.pop(job.name, None)
        if rows is None:
            raise OutputError(f"internal error: FP8 scale {job.name!r} is written before its weight {job.scale_of!r}")
        yield torch.cat(rows)

    def _given(self, job: TensorJob, inputs: Iterable[int]) -> Any:
        """Whole-model statistics of ``job`` for its inputs ``inputs`` (``scope: global``), or None."""
        if self.model_statistics is None:
            return None
        return self.model_statistics.for_tensor(job.name, tuple(inputs))

    def expect(self, jobs: Sequence[TensorJob]) -> None:
        """The tensors about to be merged, in order (one output unit's): a method with ``merge_many`` then
        merges several at once (``lookahead.py``).  Without a call every tensor is merged on its own."""
        self._ahead.expect(jobs)

    def merge_update(self, job: TensorJob) -> tuple[MergeResult | None, torch.Tensor | None, bool]:
        """The method's result for ``job`` in canonical ``[d_out, d_in]`` orientation.

        Returns:
            The result (None when no input changes the tensor), the base values in canonical
            orientation when they were read (None otherwise), and whether the stored tensor is
            the transpose of the canonical one.
        """
        self.device = self.device_for(job)
        if self._ahead.in_flight(job.name):
            self._start_after(self._ahead.collect())
        ready = self._ahead.pop(job.name)
        if ready is not None:
            return ready
        if self._batchable(job):
            return self._merge_ahead(job)
        inputs, params, stored_base, transposed = self._merge_inputs(job)
        if inputs is None:
            return None, stored_base, transposed
        return self.method.merge(inputs, params), stored_base, transposed

    def _merge_inputs(self, job: TensorJob) -> tuple[MergeInputs | None, dict[str, Any], torch.Tensor | None, bool]:
        """What the method sees for ``job`` (None when no input changes it) and its params (``job_params``), the
        base values if read, transposed."""
        base, updates, weights, indices, transposed = self._whole_updates(job)
        needs_values = self._needs_base_values(job)
        stored_base = base if needs_values else None
        if not updates:
            return None, self.params, stored_base, transposed
        generator = torch.Generator(device=self.device)
        generator.manual_seed(tensor_seed(self.plan.recipe.seed, job.name))
        return (MergeInputs(job.name, base, tuple(updates), tuple(weights), generator, self._given(job, indices)),
                job_params(self.params, job, indices),
                stored_base, transposed)

    def _needs_base_values(self, job: TensorJob) -> bool:
        """Whether the method sees the base's values (a narrow load / compute dtype: a LoRA's task vector is
        taken against the merged copy ``fl(W0 + s·B·A)``, as mergekit's is)."""
        return (self.method.reads_base or self.narrow is not None
                or any(KINDS[c.kind].needs_base_values for c in job.contributions))

    def _batchable(self, job: TensorJob) -> bool:
        """Whether ``job`` may be merged in a batch: the method has ``merge_many``, the tensor merges on the
        worker device from factors alone (small to keep for a while), not in row blocks."""
        return (self.method.merge_many is not None and bool(job.contributions) and not self.method.reads_base
                and all(KINDS[c.kind].low_rank for c in job.contributions)
                and not streams_method_rows(job, self.method, self.params)
                and self.device_for(job) == self.main_device)

    def _merge_ahead(self, job: TensorJob) -> tuple[MergeResult | None, torch.Tensor | None, bool]:
        """Merge ``job`` with the batchable tensors after it in its unit in one ``merge_many`` call; the
        others' results are kept for their turn, and the next window starts on the lookahead thread
        (``lookahead.py``)."""
        window = self._ahead.window(job, self._batchable, LOOKAHEAD_BYTES)
        answers = self._window_task(window)()
        self._ahead.keep(window[1:], answers[1:])
        self._start_after(window)
        return answers[0]

    def _start_after(self, window: list[TensorJob]) -> None:
        """Load the inputs of the window after ``window`` here and merge them on the lookahead thread."""
        following = self._ahead.following(window[-1], self._batchable) if window else None
        if following is not None:
            nxt = self._ahead.window(following, self._batchable, LOOKAHEAD_BYTES)
            self._ahead.start(nxt, self._window_task(nxt))

    def _window_task(self, window: list[TensorJob]) -> Callable[[], list[tuple[MergeResult | None, Any, bool]]]:
        """Reads ``window``'s inputs now; returns the tensor math that merges them (any thread may run it)."""
        built = [self._merge_inputs(j) for j in window]
        given = [inputs for inputs, _, _, _ in built if inputs is not None]
        merge_many, params, device = self.method.merge_many, self.params, self.device

        def merge() -> list[tuple[MergeResult | None, Any, bool]]:
            # on another thread: inference mode and the current CUDA device are per thread
            with torch.inference_mode(), torch.cuda.device(device) if device.type == "cuda" else nullcontext():
                results = iter(merge_many(given, params) if given else [])  # type: ignore[misc]
                return [(next(results) if inputs is not None else None, base, transposed)
                        for inputs, _, base, transposed in built]
        return merge

    def close(self) -> None:
        """Stop the lookahead thread and the dense row form's pool."""
        self._ahead.close()
        if self._pass_pool is not None:
            self._pass_pool.shutdown(wait=True)
            self._pass_pool = None

    def _whole_updates(self, job: TensorJob) -> tuple[torch.Tensor, list[TaskUpdate], list[float], list[int], bool]:
        """The base as the method sees it, each changing input's whole update of ``job`` in canonical
        orientation, its weight and index, and whether the stored tensor is the transpose of the canonical one."""
        self.device = self.device_for(job)
        transposed = any(c.transposed for c in job.contributions)
        canonical = tuple(reversed(job.shape)) if transposed else job.shape
        needs_values = self._needs_base_values(job)
        base = self._base(job, canonical, transposed, needs_values)
        updates, weights, inputs = [], [], []
        for index, contribs in contributions_by_input(job).items():
            parts = [KINDS[c.kind].update(c, self._loader(c.kind), base, transposed) for c in contribs]
            update = combine_parts([p for p in parts if p is not None])
            if update is not None:
                updates.append(update)
                weights.append(contribs[0].weight)  # the plan gives every input its weight per tensor
                inputs.append(index)
        return base, updates, weights, inputs, transposed

    def _blocks(self, job: TensorJob, base: torch.Tensor | None, transposed: bool,
                update: TaskUpdate | None) -> Iterator[torch.Tensor]:
        """``W0 + ΔW`` row block by row block: base rows into the work buffer, the update added in place, the
        cast into a host buffer (``Staging``)."""
        return self._staging().host_blocks(self._merged_rows(job, base, transposed, update))

    def _merged_rows(self, job: TensorJob, base: torch.Tensor | None, transposed: bool,
                     update: TaskUpdate | None) -> Iterator[Pending]:
        if isinstance(update, LowRankUpdate):  # stored orientation: ΔWᵀ = downᵀ upᵀ
            left, right = (update.down.T, update.up.T) if transposed else (update.up, update.down)
        elif isinstance(update, DenseUpdate):
            delta = update.delta.T if transposed else update.delta
        stored = None if base is None else (base.T if transposed else base)
        for start, stop in self._row_blocks(job):
            if stored is not None:  # base values the method read: a fresh copy, as its layout may be transposed
                block = stored[start:stop].clone() if job.shape else stored.clone()
            else:
                block = self._base_rows(job, start, stop, work=True)
            if isinstance(update, LowRankUpdate):
                if update.rank:
                    block.addmm_(left[start:stop], right)
            elif isinstance(update, DenseUpdate):
                block.add_(delta[start:stop] if job.shape else delta)
            yield self._unload(job, block, start)
            del block

    def copy_ranges(self, job: TensorJob) -> Iterator[Callable[[Callable[[str, bytes], None]], None]]:
        """For an untouched tensor: callables that copy its stored bytes, chunk by chunk, into ``write_bytes``."""
        reader = self.readers.get(job.source_file)
        for start, stop in reader.byte_ranges(job.source):
            yield partial(reader.copy_range, job.source, start, stop)

    def prefetch(self, job: TensorJob) -> None:
        """Ask the kernel to start reading ``job``'s base tensor and its inputs' whole tensors (full fine-tunes,
        replaced tensors) now: a dense merge over full fine-tunes reads three models, and without it each of
        their blocks waited for the disk while the CPU idled."""
        self.readers.get(job.source_file).prefetch(job.source)
        for c in job.contributions:
            if KINDS[c.kind].whole_tensor:
                self.readers.get(c.file).prefetch(c.keys[0])
