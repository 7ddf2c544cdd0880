"""The pipeline: for each output shard, for each tensor: read → merge on the worker → cast → write.

The engine executes a ``MergePlan`` and nothing else: it holds one tensor (and the
factors of the inputs touching it) at a time, writes each shard under a temporary name
and renames it when complete, and writes the index, config and model card last.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from functools import partial
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..errors import AdapterError, OutputError
from ..jobs.faults import kill_point
from ..io.atomic import copy_file_atomic, write_bytes_atomic
from ..io.dtypes import DTYPES
from ..io.reader import CheckpointReader, open_checkpoint
from ..io.writer import ShardWriter, layout_shard, write_index
from ..jobs.journal import FileEntry, Journal, ShardEntry, file_sha256
from .memory import PeakMemoryMonitor
from ..methods import DenseUpdate, LowRankUpdate, MergeInputs, MergeResult, TaskUpdate, get_method
from ..jobs.modelcard import render_model_card
from ..names import (CONFIG_NAME, INDEX_NAME, MODEL_CARD_NAME, NOT_COPIED_NAMES, PARTIAL_SUFFIX, RECIPE_NAME,
                    WEIGHT_FILE_SUFFIXES)
from ..planning.budget import WRITE_QUEUE_DEPTH, rows_per_block, streams_dense_rows, tensor_working_set
from .pipeline import OrderedStage
from ..planning.plan import Contribution, MergePlan, ShardJob, TensorJob
from ..jobs.preflight import check_finite_inputs, check_free_space
from ..jobs.resume import JobStart, open_job

ProgressCallback = Callable[[str, int], None]


@dataclass
class ShardRecord:
    """A finished output shard."""

    file_name: str
    size: int
    sha256: str


@dataclass
class MergeReport:
    """What a finished job did and measured."""

    output_dir: Path
    device: str
    shards: list[ShardRecord] = field(default_factory=list)
    tensors_merged: int = 0
    tensors_copied: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    peak_rss: int = 0
    peak_anon_rss: int = 0
    peak_gpu_bytes: int = 0
    stats: dict[str, dict[str, float]] = field(default_factory=dict)
    resumed_shards: int = 0
    """Shards an earlier, interrupted run had finished (verified and kept)."""
    already_complete: bool = False
    """The output directory already held this job, finished: nothing was done."""
    notes: list[str] = field(default_factory=list)
    """What resuming found (shards rewritten, a discarded job)."""

    def add_shard(self, entry: ShardEntry) -> None:
        """Count a finished shard (written now, or by an interrupted run) toward the job's totals."""
        self.shards.append(ShardRecord(entry.file, entry.size, entry.sha256))
        self.bytes_written += entry.size
        self.tensors_merged += entry.tensors_merged
        self.tensors_copied += entry.tensors_copied
        self.stats.update(entry.stats)


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise OutputError("--device cuda was requested but torch sees no CUDA device; use --device auto or cpu")
    return torch.device(name)


def tensor_seed(seed: int, name: str) -> int:
    """The per-tensor random seed: a resumed or re-run job draws the same numbers."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class _Readers:
    """One lazily opened reader per input file."""

    def __init__(self) -> None:
        self._readers: dict[str, CheckpointReader] = {}

    def get(self, file: str) -> CheckpointReader:
        reader = self._readers.get(file)
        if reader is None:
            reader = CheckpointReader(open_checkpoint(file))
            self._readers[file] = reader
        return reader

    def close(self) -> None:
        for reader in self._readers.values():
            reader.close()
        self._readers.clear()


class TensorMerger:
    """The device worker: merges one ``TensorJob`` with the plan's method."""

    check_finite = True  # refuse input tensors holding NaN / Inf (run_plan's check_finite)

    def __init__(self, plan: MergePlan, device: torch.device, readers: _Readers) -> None:
        self.plan = plan
        self.main_device = device
        self.device = device  # the device of the tensor being merged (see device_for)
        self.readers = readers
        self.method = get_method(plan.recipe.method)
        self.params = dict(plan.method_params)

    def device_for(self, job: TensorJob) -> torch.device:
        """The worker device, or the CPU for a tensor whose working set exceeds --max-gpu-memory."""
        limit = self.plan.recipe.max_gpu_memory
        if self.main_device.type != "cpu" and limit is not None:
            if tensor_working_set(job, self.method)[0] > limit:
                return torch.device("cpu")
        return self.main_device

    def _load(self, file: str, key: str) -> torch.Tensor:
        tensor = self.readers.get(file).read(key, torch.float32).to(self.device)
        if self.check_finite and not bool(torch.isfinite(tensor).all()):
            raise AdapterError(f"tensor {key!r} in {file!r} holds NaN or Inf values; the input is corrupt")
        return tensor

    def _input_update(self, contribs: list[Contribution], base: torch.Tensor, transposed: bool) -> TaskUpdate | None:
        low_rank: LowRankUpdate | None = None
        dense: torch.Tensor | None = None
        for c in contribs:
            if c.kind == "lora":
                a = self._load(c.file, c.keys[0])
                b = self._load(c.file, c.keys[1])
                low_rank = LowRankUpdate(up=b.mul_(c.scale), down=a)
                continue
            value = self._load(c.file, c.keys[0])
            if c.kind == "lora_bias":
                delta = value.mul_(c.scale)
            else:  # "replacement" / "full": the task vector is the new tensor minus the base
                value = value.T if transposed else value
                if torch.equal(value, base):
                    continue  # e.g. an embedding PEFT saved unchanged
                delta = value.sub_(base)
            dense = delta if dense is None else dense.add_(delta)
        if dense is None:
            return low_rank
        if low_rank is not None:
            dense = dense.add_(low_rank.dense())
        return DenseUpdate(dense)

    def _base(self, job: TensorJob, canonical_shape: tuple[int, ...], transposed: bool,
              needs_values: bool) -> torch.Tensor:
        """The base in canonical orientation: real values, or a zero-stride placeholder of the right shape."""
        if not needs_values:
            return torch.zeros((), device=self.device).expand(canonical_shape)
        base = self.readers.get(job.source_file).read(job.source, torch.float32).to(self.device)
        return base.T if transposed else base

    def merge(self, job: TensorJob) -> tuple[Iterator[torch.Tensor], dict[str, float]]:
        """The merged tensor as row blocks (stored orientation, output dtype, CPU), and method stats.

        The method sees factors only; the base is streamed through ``W0[rows] + L[rows] @ R``
        block by block, so a tensor never needs more than its factors, one fp32 row block and
        its cast copy — unless the method or a dense input needs the base values.
        """
        if streams_dense_rows(job, self.method):
            return self._elementwise_blocks(job), {}
        result, base, transposed = self.merge_update(job)
        update = result.update if result is not None else None
        stats = result.stats if result is not None else {}
        return self._blocks(job, base, transposed, update), stats

    def _elementwise_blocks(self, job: TensorJob) -> Iterator[torch.Tensor]:
        """Merge an elementwise method one row block at a time: base rows, each input's rows, merge, cast.

        A full fine-tune of a 128k-row embedding then needs a few 64 MiB blocks instead of a whole
        fp32 base, a whole fp32 delta per input and the result.  Every input's delta enters every
        block, also where it is zero: the method is elementwise, so the result does not depend on
        the blocking.
        """
        self.device = self.device_for(job)
        out_dtype = DTYPES[job.out_dtype].torch_dtype
        by_input = _contributions_by_input(job)
        factors = {(c.file, c.keys): (self._load(c.file, c.keys[1]).mul_(c.scale), self._load(c.file, c.keys[0]))
                   for c in job.contributions if c.kind == "lora"}
        weights = tuple(contribs[0].weight for contribs in by_input.values())
        generator = torch.Generator(device=self.device)  # unused: elementwise methods draw nothing
        for start, stop in row_blocks(job.shape):
            base = self.readers.get(job.source_file).read_rows(job.source, start, stop, torch.float32).to(self.device)
            updates: list[TaskUpdate] = []
            for contribs in by_input.values():
                dense: torch.Tensor | None = None
                low_rank: LowRankUpdate | None = None
                for c in contribs:
                    if c.kind == "lora":
                        up, down = factors[(c.file, c.keys)]
                        low_rank = LowRankUpdate(up=up[start:stop], down=down)
                        continue
                    value = self.readers.get(c.file).read_rows(c.keys[0], start, stop, torch.float32).to(self.device)
                    delta = value.mul_(c.scale) if c.kind == "lora_bias" else value.sub_(base)
                    dense = delta if dense is None else dense.add_(delta)
                if dense is None:
                    updates.append(low_rank)  # type: ignore[arg-type]  # every input has a contribution
                else:
                    updates.append(DenseUpdate(dense if low_rank is None else dense.add_(low_rank.dense())))
            result = self.method.merge(MergeInputs(job.name, base, tuple(updates), weights, generator), self.params)
            update = result.update
            if (self.check_finite and isinstance(update, DenseUpdate)
                    and not math.isfinite(float(update.delta.sum()))):
                self._refuse_non_finite_rows(job, start, stop)
            if isinstance(update, LowRankUpdate):
                base.addmm_(update.up, update.down)
            else:
                base.add_(update.delta)
            yield base.to(out_dtype).contiguous().cpu()  # type: ignore[arg-type]
            del base, updates, result, update

    def _refuse_non_finite_rows(self, job: TensorJob, start: int, stop: int) -> None:
        """The merged delta of rows ``start:stop`` is not finite: name the dense input that is NaN / Inf.

        One sum over the merged delta replaces an ``isfinite`` pass over every input (NaN and Inf
        propagate through it); only when it is not finite are the inputs' rows checked one by one.
        A finite sum that overflowed finds no culprit and the merge goes on.
        """
        for c in job.contributions:
            if c.kind in ("lora", "lora_bias"):
                continue  # factors and biases were checked whole when loaded / before the job
            rows = self.readers.get(c.file).read_rows(c.keys[0], start, stop, torch.float32)
            if not bool(torch.isfinite(rows).all()):
                raise AdapterError(f"tensor {c.keys[0]!r} in {c.file!r} holds NaN or Inf values; the input is corrupt")

    def merge_update(self, job: TensorJob) -> tuple[MergeResult | None, torch.Tensor | None, bool]:
        """The method's result for ``job`` in canonical ``[d_out, d_in]`` orientation.

        Returns:
            The result (None when no input changes the tensor), the base values in canonical
            orientation when they were read (None otherwise), and whether the stored tensor is
            the transpose of the canonical one.
        """
        self.device = self.device_for(job)
        transposed = any(c.transposed for c in job.contributions)
        canonical = tuple(reversed(job.shape)) if transposed else job.shape
        needs_values = self.method.reads_base or any(c.kind in ("replacement", "full") for c in job.contributions)
        base = self._base(job, canonical, transposed, needs_values)
        by_input = _contributions_by_input(job)
        updates, weights = [], []
        for contribs in by_input.values():
            update = self._input_update(contribs, base, transposed)
            if update is not None:
                updates.append(update)
                weights.append(contribs[0].weight)  # the plan gives every input its weight per tensor
        stored_base = base if needs_values else None
        if not updates:
            return None, stored_base, transposed
        generator = torch.Generator(device=self.device)
        generator.manual_seed(tensor_seed(self.plan.recipe.seed, job.name))
        result = self.method.merge(MergeInputs(job.name, base, tuple(updates), tuple(weights), generator), self.params)
        return result, stored_base, transposed

    def _blocks(self, job: TensorJob, base: torch.Tensor | None, transposed: bool,
                update: TaskUpdate | None) -> Iterator[torch.Tensor]:
        out_dtype = DTYPES[job.out_dtype].torch_dtype
        if isinstance(update, LowRankUpdate):  # stored orientation: ΔWᵀ = downᵀ upᵀ
            left, right = (update.down.T, update.up.T) if transposed else (update.up, update.down)
        elif isinstance(update, DenseUpdate):
            delta = update.delta.T if transposed else update.delta
        stored = None if base is None else (base.T if transposed else base)
        for start, stop in row_blocks(job.shape):
            if stored is not None:
                block = stored[start:stop].clone() if job.shape else stored.clone()
            else:
                block = self.readers.get(job.source_file).read_rows(job.source, start, stop, torch.float32)
                block = block.to(self.device)
            if isinstance(update, LowRankUpdate):
                if update.rank:
                    block.addmm_(left[start:stop], right)
            elif isinstance(update, DenseUpdate):
                block.add_(delta[start:stop] if job.shape else delta)
            yield block.to(out_dtype).contiguous().cpu()  # type: ignore[arg-type]
            del block


def _contributions_by_input(job: TensorJob) -> dict[int, list[Contribution]]:
    """``job``'s contributions grouped by input, in the order the plan lists them (an input may bring several)."""
    by_input: dict[int, list[Contribution]] = {}
    for c in job.contributions:
        by_input.setdefault(c.input_index, []).append(c)
    return by_input


def row_blocks(shape: tuple[int, ...]) -> Iterator[tuple[int, int]]:
    """Row ranges of a tensor whose fp32 blocks stay near ``budget.BLOCK_BYTES`` (at least one row)."""
    if not shape:
        yield 0, 1
        return
    rows = shape[0]
    step = rows_per_block(shape)
    for start in range(0, rows, step):
        yield start, min(rows, start + step)
    if rows == 0:
        yield 0, 0


def prepare_output_dir(out_dir: Path) -> None:
    """Create ``out_dir``; refuse one that already holds files (never overwrite a model)."""
    if out_dir.exists():
        if not out_dir.is_dir():
            raise OutputError(f"output path {str(out_dir)!r} exists and is not a directory")
        leftovers = [p for p in out_dir.iterdir() if not p.name.endswith(PARTIAL_SUFFIX)]
        if leftovers:
            raise OutputError(
                f"output directory {str(out_dir)!r} is not empty (it holds {sorted(p.name for p in leftovers)[:5]}); "
                "choose a new directory or empty it")
        for p in out_dir.iterdir():
            p.unlink()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create output directory {str(out_dir)!r}: {e.strerror or e}") from e


def write_shard(shard_path: Path, jobs: tuple[TensorJob, ...], merger: TensorMerger, report: MergeReport,
                progress: ProgressCallback | None) -> ShardRecord:
    """Write one output shard, tensor by tensor, and rename it into place when complete.

    Merging happens on this thread; writes, checksums and byte copies run on a background
    stage behind a bounded queue, so the disk stays busy while the next tensor is merged.
    """
    layout = layout_shard((t.name, t.out_dtype, t.shape) for t in jobs)
    with ShardWriter(shard_path, layout) as writer, \
            OrderedStage("streammerge-writer", max_pending=WRITE_QUEUE_DEPTH) as stage:
        for i, job in enumerate(jobs):
            if i + 1 < len(jobs):  # ask the kernel to start reading the next tensor now
                merger.readers.get(jobs[i + 1].source_file).prefetch(jobs[i + 1].source)
            if job.is_copy:
                reader = merger.readers.get(job.source_file)
                for start, stop in reader.byte_ranges(job.source):
                    stage.submit(partial(reader.copy_range, job.source, start, stop, writer.write_bytes))
                report.tensors_copied += 1
            else:
                blocks, stats = merger.merge(job)
                for block in blocks:
                    stage.submit(partial(writer.write_tensor_block, job.name, block))
                    del block
                if stats:
                    report.stats[job.name] = stats
                report.tensors_merged += 1
            if progress is not None:
                progress(job.name, job.out_bytes)
        stage.drain()
        digest = writer.commit()
    return ShardRecord(shard_path.name, layout.file_size, digest)


def model_files(plan: MergePlan) -> list[Path]:
    """The base's config, tokenizer and generation files: copied to the output."""
    base_root = Path(plan.base_dir)
    if base_root.is_file():
        base_root = base_root.parent
    return [path for path in sorted(base_root.iterdir())
            if path.is_file() and not path.name.startswith(".") and path.name not in NOT_COPIED_NAMES
            and not path.name.endswith((*WEIGHT_FILE_SUFFIXES, PARTIAL_SUFFIX))]


def copy_model_files(plan: MergePlan, out_dir: Path) -> list[str]:
    """Copy config, tokenizer and generation files durably; apply the plan's config updates."""
    names = []
    for path in model_files(plan):
        if path.name == CONFIG_NAME and plan.config_updates:
            config = json.loads(path.read_text(encoding="utf-8"))
            config.update(dict(plan.config_updates))
            write_bytes_atomic(out_dir / CONFIG_NAME, (json.dumps(config, indent=2) + "\n").encode())
        else:
            copy_file_atomic(path, out_dir / path.name)
        names.append(path.name)
        kill_point("file")
    return names


def recipe_record(plan: MergePlan) -> bytes:
    """``streammerge_recipe.json``: the resolved recipe (loadable by ``streammerge merge FILE``) and its sources."""
    doc = {"recipe": plan.resolved_recipe().to_dict(), "plan_fingerprint": plan.fingerprint(),
           "sources": [asdict(s) for s in plan.sources]}
    return (json.dumps(doc, indent=2) + "\n").encode()


def _write_and_record(out_dir: Path, shard: ShardJob, merger: TensorMerger, journal: Journal,
                      progress: ProgressCallback | None) -> ShardEntry:
    """Write one shard, then journal it (with its counts and stats, which a resumed run reuses)."""
    part = MergeReport(output_dir=out_dir, device=str(merger.device))
    record = write_shard(out_dir / shard.file_name, shard.tensors, merger, part, progress)
    kill_point("shard")
    entry = ShardEntry(record.file_name, record.size, record.sha256, part.tensors_merged, part.tensors_copied,
                       part.stats)
    journal.add_shard(entry)
    return entry


def _bytes_to_write(plan: MergePlan, job: JobStart) -> int:
    shards = sum(s.file_size for s in plan.shards if s.file_name not in job.done)
    return shards + sum(p.stat().st_size for p in model_files(plan)) + (1 << 20)  # + index, card, journal


def run_plan(plan: MergePlan, out_dir: str | Path, progress: ProgressCallback | None = None, *,
             restart: bool = False, check_finite: bool = True) -> MergeReport:
    """Execute ``plan`` into ``out_dir``; resume there if it holds an interrupted run of the same job.

    Args:
        plan: the plan to execute.
        out_dir: a new or empty directory, or one holding this job (finished shards are
            verified and kept; a finished job is left as it is, ``already_complete``).
        progress: called with each tensor's name and output bytes.
        restart: discard a job of ours found in ``out_dir`` (never files we did not write).
        check_finite: refuse adapters holding NaN / Inf before writing (and any input tensor
            the worker reads).

    Raises:
        OutputError: ``out_dir`` holds files that are not this job's, or cannot be written
            (``DiskSpaceError`` when the disk is too small or full).
        ResumeError: ``out_dir`` holds a job with another recipe or other inputs.
        AdapterError: an input holds NaN or Inf values.
    """
    out_dir = Path(out_dir)
    device = resolve_device(plan.recipe.device)
    if plan.recipe.output_format == "adapter":
        from ..sinks.peft_adapter import write_adapter_output

        if check_finite:
            check_finite_inputs(plan)
        return write_adapter_output(plan, out_dir, device, progress)
    job = open_job(out_dir, plan, [p.name for p in model_files(plan)], restart)
    report = MergeReport(output_dir=out_dir, device=str(device), notes=list(job.notes))
    if job.complete:
        report.already_complete = True
        for shard in plan.shards:
            report.add_shard(job.done[shard.file_name])
        return report
    if check_finite:
        check_finite_inputs(plan)
    check_free_space(out_dir, _bytes_to_write(plan, job))
    journal = job.begin()
    readers = _Readers()
    start = time.perf_counter()
    try:
        with PeakMemoryMonitor() as monitor, torch.inference_mode():
            merger = TensorMerger(plan, device, readers)
            merger.check_finite = check_finite
            for shard in plan.shards:
                entry = job.done.get(shard.file_name)
                if entry is None:
                    entry = _write_and_record(out_dir, shard, merger, journal, progress)
                else:
                    report.resumed_shards += 1
                    for t in shard.tensors if progress is not None else ():
                        progress(t.name, t.out_bytes)
                report.add_shard(entry)
            written = copy_model_files(plan, out_dir)
            if plan.write_index:
                weight_map = {t.name: s.file_name for s in plan.shards for t in s.tensors}
                write_index(out_dir, weight_map, sum(t.out_bytes for s in plan.shards for t in s.tensors))
                kill_point("file")
                written.append(INDEX_NAME)
            report.seconds = time.perf_counter() - start
            report.peak_rss, report.peak_anon_rss = monitor.peak_rss, monitor.peak_anon_rss
            if device.type == "cuda":
                report.peak_gpu_bytes = torch.cuda.max_memory_allocated(device)
            write_bytes_atomic(out_dir / RECIPE_NAME, recipe_record(plan))
            kill_point("file")
            write_bytes_atomic(out_dir / MODEL_CARD_NAME, render_model_card(plan, report).encode())
            kill_point("file")
            written += [RECIPE_NAME, MODEL_CARD_NAME]
            journal.add_complete({n: FileEntry((out_dir / n).stat().st_size, file_sha256(out_dir / n))
                                  for n in written})
        report.peak_rss, report.peak_anon_rss = monitor.peak_rss, monitor.peak_anon_rss
    finally:
        readers.close()
    return report
