"""``--output-format adapter``: write the merge as one PEFT LoRA adapter instead of a full model.

Low-rank results (Task Arithmetic, DO-Merging and other exact methods on LoRA inputs:
``ΔW = up @ down`` of rank ``Σ r_i``) are written exactly: ``lora_B = up``, ``lora_A = down``,
``lora_alpha = r`` per module so PEFT's scale is 1, each module's rank in ``rank_pattern``.
Dense results (TIES, DARE, full fine-tunes, ...) — and low-rank ones when ``--rank k`` is
given — are truncated to rank k by SVD; the relative error ``‖ΔW − ΔW_k‖_F / ‖ΔW‖_F`` is
reported per module (``adapter_layout.py`` says where each tensor goes).

Output units are **parts**: the adapter tensors of the modules whose base tensors sit in one
base shard, written as a scratch safetensors file ``adapter_model.part-0000k-of-0000n.safetensors``
(each tensor spooled as it is made, the part laid out when complete) and journaled like a shard,
so an interrupted job resumes at the next part.  ``finish`` lays out ``adapter_model.safetensors``
from the parts (header first, bytes copied) and writes ``adapter_config.json``; the parts are
deleted once the job is complete.  Memory stays at one tensor, disk at twice the adapter.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any, BinaryIO

import torch

from ..errors import OutputError, StreamMergeError
from ..inputs.lora import PEFT_PREFIX
from ..inputs.peft_config import peft_lora_config
from ..io.atomic import partial_path, write_bytes_atomic
from ..io.dtypes import DTYPES, byte_size, safetensors_name
from ..io.header import read_header
from ..io.reader import BLOCK_BYTES, CheckpointReader, open_checkpoint
from ..io.writer import ShardWriter, layout_shard, tensor_bytes
from ..jobs.faults import kill_point
from ..methods import DenseUpdate, TaskUpdate
from ..methods.extraction import RELATIVE_NORM_STAT, SKIPPED_STAT, relative_norm
from ..names import ADAPTER_CONFIG_NAME, ADAPTER_PART_TEMPLATE, ADAPTER_WEIGHTS_NAME, SPOOL_SUFFIX
from ..inputs.base_formats import read_config
from ..planning.plan import MergePlan, TensorJob, resolve_dtype, tensor_seed
from .adapter_layout import AdapterTarget, adapter_targets, canonical_for, factorize, split_name
from .base import CardFacts, OutputUnit, ProgressCallback, Sink, TensorSource, UnitResult, UnitTally

__all__ = ["PeftAdapterSink", "DEFAULT_ADAPTER_DTYPE"]

DEFAULT_ADAPTER_DTYPE = "F32"


class _Spool:
    """Tensors appended to a scratch file as they are made, then laid out as one safetensors file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        try:
            self._file: BinaryIO = open(path, "w+b")
        except OSError as e:
            raise OutputError(f"cannot create {str(path)!r}: {e.strerror or e}") from e

    def add(self, name: str, tensor: torch.Tensor) -> None:
        data = tensor_bytes(tensor.detach().contiguous().cpu())
        offset = self._file.tell()
        try:
            self._file.write(data)
        except OSError as e:
            raise OutputError(f"cannot write {str(self.path)!r}: {e.strerror or e}") from e
        self.entries[name] = (safetensors_name(tensor.dtype), tuple(tensor.shape), offset, len(data))

    def write(self, dest: Path) -> UnitResult:
        layout = layout_shard((n, d, s) for n, (d, s, _, _) in self.entries.items())
        self._file.flush()
        with ShardWriter(dest, layout) as writer:
            for slot in layout.slots:
                _, _, offset, size = self.entries[slot.name]
                self._file.seek(offset)
                for start in range(0, size, BLOCK_BYTES):
                    writer.write_bytes(slot.name, self._file.read(min(BLOCK_BYTES, size - start)))
            digest = writer.commit()
        return UnitResult(layout.file_size, digest)

    def close(self) -> None:
        self._file.close()
        self.path.unlink(missing_ok=True)


def _whole(blocks: Any) -> torch.Tensor:
    parts = list(blocks)
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _write_target(spool: _Spool, target: AdapterTarget, update: TaskUpdate, stats: dict[str, float],
                  transposed: bool, rank: int | None, dtype: torch.dtype, seed: int,
                  small: tuple[float, torch.Tensor] | None = None) -> dict[str, float]:
    """Spool one target's adapter tensors; ``small``: (min_relative_norm, base values) to leave a small update out."""
    key = f"{PEFT_PREFIX}{target.module}"
    if target.kind == "bias":
        spool.add(f"{key}.lora_B.bias", update.dense().to(dtype))
        return dict(stats)
    if small is not None and isinstance(update, DenseUpdate):
        ratio = relative_norm(update.delta, small[1])
        stats = {**stats, RELATIVE_NORM_STAT: ratio}
        if ratio <= small[0]:  # ||dW|| <= X * ||W0||: left out, all of it is the error
            return {**stats, SKIPPED_STAT: 1.0, "adapter_rank": 0.0, "truncation_error": 1.0 if ratio else 0.0}
        stats[SKIPPED_STAT] = 0.0
    factors, error = factorize(canonical_for(target, update, transposed), rank, seed)
    if factors.rank == 0:  # nothing to add (e.g. KnOTS kept no direction): PEFT has no rank-0 LoRA
        return {**stats, "adapter_rank": 0.0, "truncation_error": error}
    if target.kind == "embedding":
        spool.add(f"{key}.lora_embedding_A", factors.down.to(dtype))
        spool.add(f"{key}.lora_embedding_B", factors.up.to(dtype))
    else:
        spool.add(f"{key}.lora_A.weight", factors.down.to(dtype))
        spool.add(f"{key}.lora_B.weight", factors.up.to(dtype))
    return {**stats, "adapter_rank": float(factors.rank), "truncation_error": error}


class PeftAdapterSink(Sink):
    """One merged PEFT LoRA adapter that ``PeftModel.from_pretrained(base, DIR)`` loads."""

    format = "adapter"
    keeps_units = False

    def __init__(self, plan: MergePlan) -> None:
        super().__init__(plan)
        root = Path(plan.base_dir)
        self.base_config = read_config(root if root.is_dir() else root.parent)
        targets, self._problems = adapter_targets(plan, self.base_config)
        self.targets = {t.tensor: t for t in targets}
        self.dtype_name = resolve_dtype(plan.recipe.dtype) or DEFAULT_ADAPTER_DTYPE
        self.dtype = DTYPES[self.dtype_name].torch_dtype
        self.module_jobs: dict[str, list[TensorJob]] = {}
        for job in plan.tensors:
            self.module_jobs.setdefault(split_name(job.name)[0], []).append(job)
        self._units = self._lay_out_units()

    def _lay_out_units(self) -> tuple[OutputUnit, ...]:
        """One part per base shard holding adapted modules; a module's tensors all go to its first tensor's part."""
        part_of_module: dict[str, str] = {}
        groups: dict[str, list[TensorJob]] = {name: [] for name in self.plan.base_files}
        for job in self.plan.tensors:
            if job.name not in self.targets:
                continue
            prefix = split_name(job.name)[0]
            part = part_of_module.setdefault(prefix, Path(job.source_file).name)
            groups[part].append(job)
        filled = [g for g in groups.values() if g]
        return tuple(OutputUnit(ADAPTER_PART_TEMPLATE.format(index=i + 1, count=len(filled)), tuple(g), None)
                     for i, g in enumerate(filled))

    def problems(self) -> list[str]:
        if self.plan.recipe.max_shard_size is not None:
            return ["max_shard_size: an adapter is written as one file; drop --max-shard-size", *self._problems]
        return list(self._problems)

    def units(self) -> tuple[OutputUnit, ...]:
        return self._units

    def final_names(self) -> list[str]:
        return [ADAPTER_WEIGHTS_NAME, ADAPTER_CONFIG_NAME]

    def write_unit(self, unit: OutputUnit, out_dir: Path, source: TensorSource, tally: UnitTally,
                   progress: ProgressCallback | None) -> UnitResult:
        """Merge each tensor of ``unit``, spool its adapter tensors, lay the part out; remember ranks and modules."""
        spool = _Spool(partial_path(out_dir / (unit.file_name + SPOOL_SUFFIX)))
        ranks: dict[str, int] = {}
        d_out: dict[str, int] = {}
        biases: set[str] = set()
        saved: set[str] = set()
        left_out: set[str] = set()  # modules_to_save modules left out by min_relative_norm
        try:
            for job in unit.tensors:
                target = self.targets[job.name]
                if target.kind == "saved":
                    tally.tensors_merged += 1
                    if target.module not in saved and target.module not in left_out:
                        if self._small_module(job, source, tally):
                            left_out.add(target.module)
                        else:
                            saved.add(target.module)  # modules_to_save holds every parameter of the module
                            self._save_module(job, target, source, spool, tally)
                else:
                    result, base, transposed = source.merge_update(job)
                    if result is not None:  # None: every input equals the base here
                        threshold = self.plan.recipe.min_relative_norm
                        cutoff = (threshold, base) if threshold is not None and base is not None else None
                        stats = _write_target(spool, target, result.update, result.stats, transposed,
                                              self.plan.recipe.rank, self.dtype,
                                              tensor_seed(self.plan.recipe.seed, job.name), cutoff)
                        tally.stats[job.name] = stats
                        tally.tensors_merged += 1
                        if target.kind == "bias":
                            biases.add(target.module)
                        elif stats["adapter_rank"] > 0:
                            ranks[target.module] = int(stats["adapter_rank"])
                            d_out[target.module] = int(job.shape[1] if transposed else job.shape[0])
                if progress is not None:
                    progress(job.name, job.out_bytes)
            written = spool.write(out_dir / unit.file_name)
        finally:
            spool.close()
        tally.extra = {"ranks": ranks, "d_out": d_out, "biases": sorted(biases), "saved": sorted(saved)}
        return written

    def _small_module(self, job: TensorJob, source: TensorSource, tally: UnitTally) -> bool:
        """With ``min_relative_norm``: whether every tensor of ``job``'s module changed by at most that fraction of
        its base norm (then it is left out of ``modules_to_save``); each tensor's ratio goes to the stats."""
        threshold = self.plan.recipe.min_relative_norm
        if threshold is None:
            return False
        ratios = {}
        for part in self.module_jobs[split_name(job.name)[0]]:
            result, base, _ = source.merge_update(part)
            if result is None:
                ratios[part.name] = 0.0
            elif base is None or not base.ndim:
                return False  # the base values were not read (a LoRA bias): kept
            else:
                ratios[part.name] = relative_norm(result.update.dense(), base)
        small = all(r <= threshold for r in ratios.values())
        for name, ratio in ratios.items():
            tally.stats[name] = {RELATIVE_NORM_STAT: ratio, SKIPPED_STAT: float(small)}
        return small

    def _save_module(self, job: TensorJob, target: AdapterTarget, source: TensorSource, spool: _Spool,
                     tally: UnitTally) -> None:
        for part in self.module_jobs[split_name(job.name)[0]]:
            blocks, stats = source.merged_blocks(part)
            spool.add(f"{PEFT_PREFIX}{target.module}.{split_name(part.name)[1]}", _whole(blocks))
            if stats:
                tally.stats[part.name] = stats

    def finish(self, out_dir: Path, extras: list[dict[str, Any]]) -> list[str]:
        """Lay out ``adapter_model.safetensors`` from the parts (plus zero biases) and write ``adapter_config.json``."""
        ranks: dict[str, int] = {}
        d_out: dict[str, int] = {}
        biases: set[str] = set()
        saved: set[str] = set()
        for extra in extras:
            ranks.update(extra["ranks"])
            d_out.update(extra["d_out"])
            biases.update(extra["biases"])
            saved.update(extra["saved"])
        if not ranks:
            raise OutputError("the merged update is zero everywhere; there is no adapter to write")
        orphans = sorted(biases - set(ranks))
        if orphans:
            raise OutputError(f"modules {orphans[:3]} change only their bias, which PEFT's lora_bias cannot hold "
                              "without a LoRA weight; use --output-format model")
        linear = {t.module for t in self.targets.values() if t.kind == "linear"}
        zero_biases = {f"{PEFT_PREFIX}{m}.lora_B.bias": (d_out[m],)
                       for m in sorted((set(ranks) & linear) - biases)} if biases else {}
        self._assemble(out_dir, zero_biases)
        kill_point("file")
        fan = any(t.fan_in_fan_out for t in self.targets.values() if t.kind == "linear")
        config = self._config(ranks, saved, fan, bool(biases))
        write_bytes_atomic(out_dir / ADAPTER_CONFIG_NAME, (json.dumps(config, indent=2) + "\n").encode())
        kill_point("file")
        return [ADAPTER_WEIGHTS_NAME, ADAPTER_CONFIG_NAME]

    def _assemble(self, out_dir: Path, zero_biases: dict[str, tuple[int, ...]]) -> None:
        readers = [CheckpointReader(open_checkpoint(out_dir / u.file_name)) for u in self._units]
        try:
            where: dict[str, CheckpointReader] = {}
            entries = []
            for reader in readers:
                for name in reader.layout.shard_of:
                    info = reader.layout.info(name)
                    where[name] = reader
                    entries.append((name, info.dtype, info.shape))
            entries += [(name, self.dtype_name, shape) for name, shape in zero_biases.items()]
            layout = layout_shard(entries)
            with ShardWriter(out_dir / ADAPTER_WEIGHTS_NAME, layout) as writer:
                for slot in layout.slots:
                    reader = where.get(slot.name)
                    if reader is None:
                        writer.write_bytes(slot.name, bytes(slot.nbytes))
                        continue
                    for start, stop in reader.byte_ranges(slot.name):
                        reader.copy_range(slot.name, start, stop, writer.write_bytes)
                writer.commit()
        finally:
            for reader in readers:
                reader.close()

    def _config(self, ranks: dict[str, int], saved: set[str], fan_in_fan_out: bool, lora_bias: bool) -> dict[str, Any]:
        r = Counter(ranks.values()).most_common(1)[0][0]
        # Patterns are regexes matched against a dotted suffix of the module path: escape the full path.
        pattern = {re.escape(m): k for m, k in sorted(ranks.items()) if k != r}
        architecture = (self.base_config.get("architectures") or [""])[0]
        base = self.plan.sources[0] if self.plan.sources else None
        return peft_lora_config(
            base=self.plan.recipe.base, revision=(base.commit if base and base.commit else self.plan.recipe.revision),
            task_type="CAUSAL_LM" if architecture.endswith("ForCausalLM") else None,
            target_modules=sorted(ranks), r=r, lora_alpha=r, rank_pattern=pattern,
            alpha_pattern={k: float(v) for k, v in pattern.items()}, modules_to_save=sorted(saved),
            fan_in_fan_out=fan_in_fan_out, lora_bias=lora_bias)

    def output_bytes(self) -> int:
        jobs = {t.name: t for t in self.plan.tensors}
        ranks = {s.index: max(s.ranks, default=0) for s in self.plan.inputs}
        size = 0
        for t in self.targets.values():
            job = jobs[t.tensor]
            if t.kind in ("linear", "embedding"):
                exact = sum(ranks.get(i, 0) for i in {c.input_index for c in job.contributions})
                rank = self.plan.recipe.rank if self.plan.recipe.rank is not None else exact
                size += byte_size(self.dtype_name, (min(rank, min(job.shape)) * sum(job.shape),))
            else:
                size += job.out_bytes
        return 2 * size  # the parts, then the assembled file

    def describe(self) -> str:
        counts = Counter(t.kind for t in self.targets.values())
        rank = self.plan.recipe.rank
        how = f"truncated to rank {rank} by SVD" if rank else "exact factors (rank Σr per module)"
        return (f"write: a PEFT LoRA adapter ({how}): {counts['linear']} linear, {counts['embedding']} embedding, "
                f"{counts['bias']} bias, {counts['saved']} modules_to_save tensor(s), about "
                f"{self.output_bytes() / 2 / 2**20:.1f} MiB, {self.dtype_name}, in {len(self._units)} part(s); "
                "README.md, streammerge_recipe.json")

    def card_facts(self) -> CardFacts:
        rank = self.plan.recipe.rank
        return CardFacts(
            library_name="peft", title="Merged LoRA adapter", base_model_relation=None, tags=("lora",),
            usage=("```python", "from peft import AutoPeftModelForCausalLM",
                   'model = AutoPeftModelForCausalLM.from_pretrained("path/to/this/adapter")', "```"),
            sentence=("; the merged update is stored as a PEFT LoRA adapter "
                      f"({'truncated to rank ' + str(rank) + ' by SVD' if rank else 'exact factors'})"))

    @classmethod
    def check_output(cls, out_dir: Path, unit_names: list[str] | None) -> tuple[list[str], list[str], list[str]]:
        """The adapter file's header is valid and ``adapter_config.json`` is a LoRA config."""
        problems: list[str] = []
        checked: list[str] = []
        try:
            header = read_header(out_dir / ADAPTER_WEIGHTS_NAME)
            checked.append(f"{ADAPTER_WEIGHTS_NAME}: header valid, {len(header.tensors)} tensors")
        except StreamMergeError as e:
            problems.append(f"{ADAPTER_WEIGHTS_NAME}: {e}")
        try:
            config = json.loads((out_dir / ADAPTER_CONFIG_NAME).read_text(encoding="utf-8"))
            if not isinstance(config, dict) or config.get("peft_type") != "LORA":
                problems.append(f"{ADAPTER_CONFIG_NAME}: not a PEFT LoRA config")
        except (OSError, ValueError) as e:
            problems.append(f"{ADAPTER_CONFIG_NAME}: cannot be read ({e})")
        return checked, problems, []
