"""``--output-format adapter``: write the merge as one PEFT LoRA adapter instead of a full model.

Low-rank results (Task Arithmetic, DO-Merging and other exact methods on LoRA inputs:
``ΔW = up @ down`` of rank ``Σ r_i``) are written exactly: ``lora_B = up``, ``lora_A = down``,
``lora_alpha = r`` per module so PEFT's scale is 1, each module's rank in ``rank_pattern``.
Dense results (TIES, DARE, full fine-tunes, ...) — and low-rank ones when ``--rank k`` is
given — are truncated to rank k by SVD; the relative error ``‖ΔW − ΔW_k‖_F / ‖ΔW‖_F`` is
reported per module.

Module kinds: Linear (``lora_A``/``lora_B``); GPT-2 ``Conv1D`` (the same, ``fan_in_fan_out``);
Embedding (``lora_embedding_A [r, vocab]``, ``lora_embedding_B [hidden, r]``, ΔW = (B A)ᵀ);
the bias of a LoRA-targeted Linear (``lora_B.bias`` with ``lora_bias``); any other changed
tensor (norms, other biases) through ``modules_to_save`` with the module's merged values.
Whatever PEFT cannot express is refused at plan time with the reason.

The factors' ranks are known only once each tensor is merged, so tensors are spooled to a
``.partial`` file as they are made and the final safetensors file (header first) is written
from the spool at the end: memory stays at one tensor, disk at twice the adapter.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..inputs.lora import PEFT_PREFIX
from ..errors import OutputError, PlanError
from ..io.atomic import partial_path, write_bytes_atomic
from ..io.dtypes import DTYPES, byte_size, safetensors_name
from ..io.writer import ShardWriter, layout_shard, tensor_bytes
from ..execution.memory import PeakMemoryMonitor
from ..methods import DenseUpdate, LowRankUpdate, TaskUpdate, get_method
from ..methods.lowrank import product_svd
from ..names import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, MODEL_CARD_NAME, RECIPE_NAME
from ..planning.plan import Contribution, MergePlan, TensorJob, read_config, resolve_dtype

if TYPE_CHECKING:
    from ..execution.engine import MergeReport, ProgressCallback, TensorMerger

__all__ = ["AdapterTarget", "adapter_targets", "adapter_problems", "describe_adapter_output", "factorize",
           "write_adapter_output"]

EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "wpe.weight", "word_embeddings.weight",
                      "embed_positions.weight")
# Model types whose Linear-like layers are transformers' Conv1D (weight stored [d_in, d_out]).
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt"})
DEFAULT_ADAPTER_DTYPE = "F32"
_SPOOL_NAME = "adapter_model.spool"
_BASE_LAYER_KEY = ".base_layer."
_COPY_CHUNK = 64 << 20


@dataclass(frozen=True)
class AdapterTarget:
    """How one merged tensor goes into the adapter.

    Attributes:
        tensor: the base tensor name.
        module: the PEFT module path its keys are saved under.
        kind: "linear", "embedding", "bias" (lora_B.bias) or "saved" (modules_to_save).
        fan_in_fan_out: the module is a Conv1D (weight stored transposed).
    """

    tensor: str
    module: str
    kind: str
    fan_in_fan_out: bool = False


def _split(name: str) -> tuple[str, str]:
    prefix, _, leaf = name.rpartition(".")
    return prefix, leaf


def _module_names(jobs: list[TensorJob]) -> dict[str, str]:
    """Module path per tensor prefix: the input adapters' own spelling (PEFT took it from the real model)."""
    names = {}
    for job in jobs:
        for c in job.contributions:
            if c.kind == "lora":
                names[_split(job.name)[0]] = c.keys[0].removeprefix(PEFT_PREFIX).rsplit(".lora_", 1)[0]
                break
    return names


def _dense(c: Contribution) -> bool:
    """Whether a contribution makes the update dense.  PEFT saves embedding layers it wraps
    (``….base_layer.weight``) even when unchanged; the engine drops those equal to the base, so
    they are assumed unchanged here and checked when the tensor is merged."""
    return c.kind == "full" or (c.kind == "replacement" and _BASE_LAYER_KEY not in c.keys[0])


def adapter_targets(plan: MergePlan, base_config: dict[str, Any]) -> tuple[list[AdapterTarget], list[str]]:
    """Every merged tensor's place in the adapter, and every reason the adapter cannot be written."""
    jobs = [t for s in plan.shards for t in s.tensors]
    merged = [t for t in jobs if t.contributions]
    modules = _module_names(merged)
    low_rank_prefixes = {_split(t.name)[0] for t in merged if len(t.shape) == 2}
    conv1d = base_config.get("model_type") in CONV1D_MODEL_TYPES
    dense_method = get_method(plan.recipe.method).dense_inputs
    targets: list[AdapterTarget] = []
    problems: list[str] = []
    need_rank: list[str] = []
    for job in merged:
        prefix, leaf = _split(job.name)
        module = modules.get(prefix, prefix)
        lora = [c for c in job.contributions if c.kind == "lora"]
        if len(job.shape) == 2:
            embedding = any("lora_embedding_" in c.keys[0] for c in lora) or job.name.endswith(EMBEDDING_SUFFIXES)
            if conv1d and not embedding and not lora:
                problems.append(
                    f"output_format: {job.name!r} of this {base_config.get('model_type')} model is a Conv1D layer, "
                    "and without a LoRA input on it its orientation for an adapter is unknown; use --output-format model")
            if plan.recipe.rank is None and (dense_method or any(_dense(c) for c in job.contributions)):
                need_rank.append(job.name)
            fan = bool(lora) and not embedding and all(c.transposed for c in lora)
            targets.append(AdapterTarget(job.name, module, "embedding" if embedding else "linear", fan))
        elif leaf == "bias" and prefix in low_rank_prefixes:
            targets.append(AdapterTarget(job.name, module, "bias"))
        else:
            targets.append(AdapterTarget(job.name, module, "saved"))
    if need_rank:
        problems.append(
            f"rank: method {plan.recipe.method!r} (or a full fine-tune / modules_to_save input) gives dense updates for "
            f"{len(need_rank)} tensor(s), e.g. {need_rank[0]!r}; an adapter stores them as a truncated SVD: "
            "pass --rank K (e.g. --rank 64), or use --output-format model")
    if len({t.fan_in_fan_out for t in targets if t.kind == "linear"}) > 1:
        problems.append("output_format: the merge changes both Conv1D (fan_in_fan_out) and Linear layers, but "
                        "fan_in_fan_out is one flag per PEFT adapter; restrict the inputs with include/exclude "
                        "filters, or use --output-format model")
    kinds = {t.kind for t in targets}
    if "bias" in kinds and "embedding" in kinds:
        problems.append("output_format: the merge changes both embeddings and Linear biases, but PEFT does not "
                        "support lora_bias with embedding LoRA; exclude one of them (include/exclude filters) "
                        "or use --output-format model")
    if not kinds & {"linear", "embedding"}:
        problems.append("output_format: the merge changes no matrix, so there is no LoRA to write; "
                        "use --output-format model")
    return targets, problems


def adapter_problems(plan: MergePlan, base_config: dict[str, Any]) -> list[str]:
    """The reasons ``plan`` cannot be written as a PEFT adapter (empty when it can)."""
    return adapter_targets(plan, base_config)[1]


def _base_config(plan: MergePlan) -> dict[str, Any]:
    root = Path(plan.base_dir)
    return read_config(root if root.is_dir() else root.parent)


def _dtype(plan: MergePlan) -> str:
    return resolve_dtype(plan.recipe.dtype) or DEFAULT_ADAPTER_DTYPE


def describe_adapter_output(plan: MergePlan) -> str:
    """One line for ``streammerge plan``: what the adapter will hold and about how big it is."""
    targets, _ = adapter_targets(plan, _base_config(plan))
    jobs = {t.name: t for s in plan.shards for t in s.tensors}
    ranks = {s.index: max(s.ranks, default=0) for s in plan.inputs}
    dtype = _dtype(plan)
    size = 0
    for t in targets:
        job = jobs[t.tensor]
        if t.kind in ("linear", "embedding"):
            exact = sum(ranks.get(i, 0) for i in {c.input_index for c in job.contributions})
            rank = plan.recipe.rank if plan.recipe.rank is not None else exact
            size += byte_size(dtype, (min(rank, min(job.shape)) * sum(job.shape),))
        else:
            size += job.out_bytes
    counts = Counter(t.kind for t in targets)
    how = f"truncated to rank {plan.recipe.rank} by SVD" if plan.recipe.rank else "exact factors (rank Σr per module)"
    return (f"write: a PEFT LoRA adapter ({how}): {counts['linear']} linear, {counts['embedding']} embedding, "
            f"{counts['bias']} bias, {counts['saved']} modules_to_save tensor(s), about {size / 2**20:.1f} MiB, "
            f"{dtype}; README.md, streammerge_recipe.json")


def factorize(update: TaskUpdate, rank: int | None) -> tuple[LowRankUpdate, float]:
    """LoRA factors of a 2-D update, and the relative Frobenius error of the truncation.

    A low-rank update within ``rank`` (or with ``rank`` None) is returned as it is (exact, error 0);
    otherwise the best rank-``rank`` approximation, σ split evenly between the factors.

    Raises:
        OutputError: a dense update with no ``rank`` to truncate to.
    """
    if isinstance(update, LowRankUpdate):
        if rank is None or update.rank <= rank:
            return update, 0.0
        u, s, vh = product_svd(update.up, update.down, rtol=0.0)
    else:
        if rank is None:
            raise OutputError("a merged update is dense (e.g. a saved embedding layer differs from the base), and an "
                              "adapter stores dense updates as a truncated SVD: pass --rank K, or use --output-format model")
        u, s, vh = torch.linalg.svd(update.delta, full_matrices=False)
    k = min(rank, s.numel())
    energy = s.double().square()
    total = float(energy.sum())
    error = (float(energy[k:].sum()) / total) ** 0.5 if total > 0 else 0.0
    root = s[:k].sqrt()
    return LowRankUpdate(up=u[:, :k] * root, down=root[:, None] * vh[:k]), error


def _canonical_for(target: AdapterTarget, update: TaskUpdate, transposed: bool) -> TaskUpdate:
    """Embedding LoRA wants ``B A = ΔWᵀ`` ([hidden, vocab]); a dense embedding update comes as ΔW."""
    if target.kind != "embedding" or transposed:
        return update
    if isinstance(update, LowRankUpdate):
        return LowRankUpdate(up=update.down.T, down=update.up.T)
    return DenseUpdate(update.delta.T)


class _Spool:
    """Tensors appended to a scratch file as they are made, then laid out as one safetensors file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        try:
            self._file = open(path, "w+b")
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

    def write(self, dest: Path) -> tuple[int, str]:
        layout = layout_shard((n, d, s) for n, (d, s, _, _) in self.entries.items())
        self._file.flush()
        with ShardWriter(dest, layout) as writer:
            for slot in layout.slots:
                _, _, offset, size = self.entries[slot.name]
                self._file.seek(offset)
                for start in range(0, size, _COPY_CHUNK):
                    writer.write_bytes(slot.name, self._file.read(min(_COPY_CHUNK, size - start)))
            digest = writer.commit()
        return layout.file_size, digest

    def close(self) -> None:
        self._file.close()
        self.path.unlink(missing_ok=True)


def _whole(blocks: Any) -> torch.Tensor:
    parts = list(blocks)
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _adapter_config(plan: MergePlan, base_config: dict[str, Any], ranks: dict[str, int], saved: set[str],
                    fan_in_fan_out: bool, lora_bias: bool) -> dict[str, Any]:
    r = Counter(ranks.values()).most_common(1)[0][0]
    # Patterns are regexes matched against a dotted suffix of the module path: escape the full path.
    pattern = {re.escape(m): k for m, k in sorted(ranks.items()) if k != r}
    architecture = (base_config.get("architectures") or [""])[0]
    base = plan.sources[0] if plan.sources else None
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM" if architecture.endswith("ForCausalLM") else None,
        "base_model_name_or_path": plan.recipe.base,
        "revision": (base.commit if base and base.commit else plan.recipe.revision),
        "r": r, "lora_alpha": r, "rank_pattern": pattern, "alpha_pattern": {k: float(v) for k, v in pattern.items()},
        "target_modules": sorted(ranks), "modules_to_save": sorted(saved) or None,
        "fan_in_fan_out": fan_in_fan_out, "lora_bias": lora_bias, "bias": "none", "use_rslora": False,
        "use_dora": False, "init_lora_weights": True, "lora_dropout": 0.0, "inference_mode": True,
        "layers_to_transform": None, "layers_pattern": None,
    }


class _AdapterBuilder:
    """Merges each target tensor and spools what the adapter holds; remembers what the config must say."""

    def __init__(self, plan: MergePlan, targets: list[AdapterTarget], merger: TensorMerger, spool: _Spool,
                 report: MergeReport) -> None:
        self.plan, self.merger, self.spool, self.report = plan, merger, spool, report
        self.targets = {t.tensor: t for t in targets}
        self.dtype = DTYPES[_dtype(plan)].torch_dtype
        self.module_jobs: dict[str, list[TensorJob]] = {}
        for job in (t for s in plan.shards for t in s.tensors):
            self.module_jobs.setdefault(_split(job.name)[0], []).append(job)
        self.ranks: dict[str, int] = {}  # LoRA module -> rank written
        self.d_out: dict[str, int] = {}
        self.linear: set[str] = {t.module for t in targets if t.kind == "linear"}
        self.biases: set[str] = set()
        self.saved: set[str] = set()

    def add(self, job: TensorJob) -> None:
        target = self.targets.get(job.name)
        if target is None:
            return
        if target.kind == "saved":
            self._save_module(job, target)
            return
        result, _, transposed = self.merger.merge_update(job)
        if result is None:  # every input equals the base here
            return
        stats = _write_target(self.spool, target, result.update, result.stats, transposed, self.plan.recipe.rank,
                              self.dtype)
        self.report.stats[job.name] = stats
        self.report.tensors_merged += 1
        if target.kind == "bias":
            self.biases.add(target.module)
        elif stats["adapter_rank"] > 0:
            self.ranks[target.module] = int(stats["adapter_rank"])
            self.d_out[target.module] = int(job.shape[1] if transposed else job.shape[0])

    def _save_module(self, job: TensorJob, target: AdapterTarget) -> None:
        self.report.tensors_merged += 1
        if target.module in self.saved:
            return
        self.saved.add(target.module)  # modules_to_save holds every parameter of the module
        for part in self.module_jobs[_split(job.name)[0]]:
            blocks, stats = self.merger.merge(part)
            self.spool.add(f"{PEFT_PREFIX}{target.module}.{_split(part.name)[1]}", _whole(blocks))
            if stats:
                self.report.stats[part.name] = stats

    def finish(self) -> None:
        """Check the collected modules; give every LoRA Linear a zero bias when lora_bias is on."""
        if not self.ranks:
            raise OutputError("the merged update is zero everywhere; there is no adapter to write")
        orphans = sorted(self.biases - set(self.ranks))
        if orphans:
            raise OutputError(f"modules {orphans[:3]} change only their bias, which PEFT's lora_bias cannot hold "
                              "without a LoRA weight; use --output-format model")
        if self.biases:
            for module in sorted((set(self.ranks) & self.linear) - self.biases):
                self.spool.add(f"{PEFT_PREFIX}{module}.lora_B.bias", torch.zeros(self.d_out[module], dtype=self.dtype))


def write_adapter_output(plan: MergePlan, out_dir: Path, device: torch.device,
                         progress: ProgressCallback | None = None) -> MergeReport:
    """Execute ``plan`` into ``out_dir`` as a PEFT adapter (the engine dispatches here)."""
    from ..execution.engine import MergeReport, ShardRecord, TensorMerger, _Readers, prepare_output_dir, recipe_record
    from ..jobs.modelcard import render_model_card

    base_config = _base_config(plan)
    targets, problems = adapter_targets(plan, base_config)
    if problems:
        raise PlanError(problems)
    prepare_output_dir(out_dir)
    report = MergeReport(output_dir=out_dir, device=str(device))
    readers = _Readers()
    spool = _Spool(partial_path(out_dir / _SPOOL_NAME))
    start = time.perf_counter()
    try:
        with PeakMemoryMonitor() as monitor, torch.inference_mode():
            builder = _AdapterBuilder(plan, targets, TensorMerger(plan, device, readers), spool, report)
            for job in (t for s in plan.shards for t in s.tensors):
                builder.add(job)
                if progress is not None:
                    progress(job.name, job.out_bytes)
            builder.finish()
            size, digest = spool.write(out_dir / ADAPTER_WEIGHTS_NAME)
            report.shards.append(ShardRecord(ADAPTER_WEIGHTS_NAME, size, digest))
            report.bytes_written = size
            fan = any(t.fan_in_fan_out for t in targets if t.kind == "linear")
            config = _adapter_config(plan, base_config, builder.ranks, builder.saved, fan, bool(builder.biases))
            write_bytes_atomic(out_dir / ADAPTER_CONFIG_NAME, (json.dumps(config, indent=2) + "\n").encode())
            report.seconds = time.perf_counter() - start
            report.peak_rss, report.peak_anon_rss = monitor.peak_rss, monitor.peak_anon_rss
            write_bytes_atomic(out_dir / RECIPE_NAME, recipe_record(plan))
            write_bytes_atomic(out_dir / MODEL_CARD_NAME, render_model_card(plan, report).encode())
        report.peak_rss, report.peak_anon_rss = monitor.peak_rss, monitor.peak_anon_rss
    finally:
        spool.close()
        readers.close()
    return report


def _write_target(spool: _Spool, target: AdapterTarget, update: TaskUpdate, stats: dict[str, float],
                  transposed: bool, rank: int | None, dtype: torch.dtype) -> dict[str, float]:
    key = f"{PEFT_PREFIX}{target.module}"
    if target.kind == "bias":
        spool.add(f"{key}.lora_B.bias", update.dense().to(dtype))
        return dict(stats)
    factors, error = factorize(_canonical_for(target, update, transposed), rank)
    if factors.rank == 0:  # nothing to add (e.g. KnOTS kept no direction): PEFT has no rank-0 LoRA
        return {**stats, "adapter_rank": 0.0, "truncation_error": error}
    if target.kind == "embedding":
        spool.add(f"{key}.lora_embedding_A", factors.down.to(dtype))
        spool.add(f"{key}.lora_embedding_B", factors.up.to(dtype))
    else:
        spool.add(f"{key}.lora_A.weight", factors.down.to(dtype))
        spool.add(f"{key}.lora_B.weight", factors.up.to(dtype))
    return {**stats, "adapter_rank": float(factors.rank), "truncation_error": error}
