"""OSRM end to end: gather task statistics (cached), compute subspaces, write adapters.

``osrm_init`` writes one PEFT LoRA initialisation per task, whose ``A`` is blind to the
other tasks' input features (arXiv 2505.22934); ``osrm_project`` moves an already trained
adapter onto such a subspace (``A ← A_osrm``, ``B ← B A A_osrmᵀ``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..inputs.lora import load_lora_adapter
from ..errors import AdapterError, InputError
from ..io.atomic import write_bytes_atomic
from ..names import ADAPTER_WEIGHTS_NAME
from .adapter import copy_adapter_files, lora_init_config, lora_key, write_adapter_dir
from .collect import (
    ModuleInfo,
    collect_task_stats,
    load_model,
    load_tokenizer,
    meta_model,
    modules_by_name,
    parse_max_memory,
    resolve_target_modules,
)
from .data import needs_tokenizer, padded_batches, read_examples
from .stats import (
    STATS_DIR_NAME,
    STATS_FORMAT_VERSION,
    TaskStats,
    file_sha256,
    load_task_stats,
    model_fingerprint,
    save_task_stats,
    stats_path,
)
from .subspace import (
    VARIANTS,
    ModuleStats,
    Subspace,
    captured_energy,
    covariance_subspace,
    means_subspace,
    pooled_second_moment,
    project_factors,
)

__all__ = ["CollectOptions", "GatherReport", "gather_stats", "module_groups", "osrm_init", "osrm_project",
           "REPORT_NAME"]

REPORT_NAME = "osrm_report.json"
_TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class CollectOptions:
    """How the base model is run over the task data.

    Attributes:
        max_examples: examples read per task (the first ones in the file).
        max_length: tokens per example (longer ones are truncated).
        batch_size: examples per forward pass.
        text_field: the text field of JSONL task files.
        device: "auto" (CUDA when present), "cpu" or "cuda".
        dtype: the model's compute dtype: "auto" (bfloat16 on CUDA, float32 on CPU) or a name.
        max_memory: accelerate memory budget per device, e.g. "cuda=20GiB,cpu=60GiB": layers
            past it are offloaded (CPU, then disk) and streamed in layer by layer.
        offload_dir: where offloaded layers go (default: <stats dir>/offload).
        stats_dir: the statistics cache (default: <out>/.osrm_stats).
        stats_on_cpu: keep the running sums in host RAM instead of on the GPU.
        backbone: run (and name modules after) the bare transformers ``AutoModel`` instead of
            ``AutoModelForCausalLM``: for adapters trained on the backbone alone, e.g. with
            task heads kept outside the adapter (module names then lack the ``model.`` prefix).
        stats_memory: bytes the running sums may take at once; when all target modules'
            ``d×d`` float64 sums exceed it, the modules are split into groups and the task data
            is run once per group (None: one pass for all modules).
    """

    max_examples: int = 256
    max_length: int = 512
    batch_size: int = 8
    text_field: str = "text"
    device: str = "auto"
    dtype: str = "auto"
    max_memory: str | None = None
    offload_dir: str | None = None
    stats_dir: str | None = None
    stats_on_cpu: bool = False
    stats_memory: int | None = None
    backbone: bool = False


@dataclass(frozen=True)
class GatherReport:
    """Which tasks' statistics were read from the cache and which were computed."""

    reused: tuple[str, ...]
    collected: tuple[str, ...]
    forward_passes: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON data."""
        return {"reused": list(self.reused), "collected": list(self.collected),
                "forward_passes": dict(self.forward_passes)}


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda was requested but torch sees no CUDA device; use --device auto or cpu")
    if name not in ("cpu", "cuda"):
        raise InputError(f"device {name!r} must be one of auto, cpu, cuda")
    return torch.device(name)


def _dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise InputError(f"dtype {name!r} must be auto or one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def check_tasks(tasks: Mapping[str, Path]) -> None:
    """Task names become file names; task files must exist."""
    for name, path in tasks.items():
        if not _TASK_NAME.match(name):
            raise InputError(f"task name {name!r} must start with a letter or digit and use only letters, digits, "
                             "'_', '-' and '.' (it names the task's adapter directory and statistics file)")
        if not Path(path).is_file():
            raise InputError(f"task {name!r}: data file {str(path)!r} does not exist")


def _fingerprint(base_fp: str, path: Path, opts: CollectOptions, dtype: torch.dtype) -> dict[str, Any]:
    return {"version": STATS_FORMAT_VERSION, "model": base_fp, "data": file_sha256(path),
            "max_examples": opts.max_examples, "max_length": opts.max_length, "text_field": opts.text_field,
            "dtype": str(dtype).removeprefix("torch.")}


def gather_stats(base: Path, tasks: Mapping[str, Path], modules: Sequence[str], second_moments: bool,
                 opts: CollectOptions, stats_dir: Path) -> tuple[dict[str, TaskStats], GatherReport]:
    """Every task's statistics for ``modules``: from the cache where it matches, else by running the model.

    The model is loaded only when some task is missing from the cache, and only the missing
    tasks are run through it.
    """
    if opts.max_examples <= 0 or opts.max_length <= 0:
        raise InputError(f"max_examples and max_length must be positive; got {opts.max_examples}, {opts.max_length}")
    device = _device(opts.device)
    dtype = _dtype(opts.dtype, device)
    base_fp = model_fingerprint(base)
    result: dict[str, TaskStats] = {}
    missing: list[tuple[str, Path, dict[str, Any], TaskStats | None]] = []
    for task, path in tasks.items():
        fp = _fingerprint(base_fp, Path(path), opts, dtype)
        cached = load_task_stats(stats_path(stats_dir, task))
        if cached is not None and cached.covers(fp, modules, second_moments):
            result[task] = cached
        else:
            missing.append((task, Path(path), fp, cached))
    passes: dict[str, int] = {}
    if missing:
        max_memory = parse_max_memory(opts.max_memory) if opts.max_memory else None
        offload = Path(opts.offload_dir) if opts.offload_dir else stats_dir / "offload"
        model = load_model(base, device, dtype, max_memory, offload if max_memory else None, opts.backbone)
        tokenizer = None
        if any(needs_tokenizer(path, opts.text_field, opts.max_examples) for _t, path, _f, _c in missing):
            tokenizer = load_tokenizer(base)
        pad_id = getattr(tokenizer, "pad_token_id", None) or 0
        vocab = getattr(model.config, "vocab_size", None)
        groups = module_groups(modules_by_name(model, modules), opts.stats_memory if second_moments else None)
        for task, path, fp, cached in missing:
            examples = read_examples(path, tokenizer, opts.max_examples, opts.max_length, opts.text_field, vocab)
            sums: dict[str, ModuleStats] = {}
            passes[task] = 0
            for group in groups:
                group_sums, n = collect_task_stats(
                    model, group, padded_batches(examples, opts.batch_size, pad_id), second_moments,
                    torch.device("cpu") if opts.stats_on_cpu else None)
                # Off the GPU as soon as a group is done: T tasks' d×d sums need not fit there together.
                sums.update({m: _on(v, torch.device("cpu")) for m, v in group_sums.items()})
                passes[task] += n
            kept = cached.modules if cached is not None and cached.fingerprint == fp else {}
            stats = TaskStats(fingerprint=fp, modules={**kept, **sums})
            save_task_stats(stats_path(stats_dir, task), stats)
            result[task] = stats
        del model
    report = GatherReport(reused=tuple(t for t in tasks if t not in passes), collected=tuple(passes),
                          forward_passes=passes)
    return {t: result[t] for t in tasks}, report


def module_groups(infos: Sequence[ModuleInfo], budget: int | None) -> list[list[str]]:
    """Split modules, in order, into groups whose float64 ``d×d`` sums fit ``budget`` bytes."""
    if budget is None:
        return [[i.name for i in infos]]
    groups: list[list[str]] = []
    used = budget + 1
    for info in infos:
        size = info.in_features**2 * 8
        if size > budget:
            raise InputError(f"module {info.name!r} alone needs {size / 2**20:.0f} MiB of statistics "
                             f"(d_in={info.in_features}), more than the statistics memory budget of "
                             f"{budget / 2**20:.0f} MiB; raise --stats-memory")
        if used + size > budget:
            groups.append([])
            used = 0
        groups[-1].append(info.name)
        used += size
    return groups


def _on(stats: ModuleStats, device: torch.device) -> ModuleStats:
    xxT = stats.sum_xxT.to(device) if stats.sum_xxT is not None else None
    return ModuleStats(count=stats.count, sum_x=stats.sum_x.to(device), sum_xxT=xxT)


def _moment(stats: Sequence[ModuleStats], center: bool) -> torch.Tensor:
    """The matrix energies are reported against: pooled second moments, or stacked means."""
    if all(s.sum_xxT is not None for s in stats):
        return pooled_second_moment(stats, center)
    means = torch.stack([s.mean() for s in stats])
    return means.T @ means / len(stats)


def _subspace(variant: str, others: Sequence[ModuleStats], rank: int, center: bool) -> Subspace:
    return covariance_subspace(others, rank, center) if variant == "covariance" else means_subspace(others, rank)


def _module_report(sub: Subspace, others: Sequence[ModuleStats], own: ModuleStats | None, variant: str,
                   center: bool) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "others_energy": captured_energy(sub.A, _moment(others, center)),
        "random_baseline": sub.rank / sub.A.shape[1],
        "null_dim": sub.null_dim,
    }
    if own is not None:
        entry["own_energy"] = captured_energy(sub.A, _moment([own], center))
    if variant == "means" and sub.short_of_null:
        # Only the means variant promises a null space; covariance ranks by eigenvalue by design.
        entry["rows_outside_null_space"] = sub.short_of_null
    return entry


def _summary(modules: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    others = [m["others_energy"] for m in modules.values()]
    out: dict[str, Any] = {"modules": len(modules), "others_energy_mean": sum(others) / len(others),
                           "others_energy_max": max(others)}
    own = [m["own_energy"] for m in modules.values() if "own_energy" in m]
    if own:
        out["own_energy_mean"] = sum(own) / len(own)
    short = sum(1 for m in modules.values() if m.get("rows_outside_null_space"))
    if short:
        out["modules_short_of_null_space"] = short
    return out


def _check_method(variant: str, rank: int | None = None) -> None:
    if variant not in VARIANTS:
        raise InputError(f"OSRM variant {variant!r} must be one of {list(VARIANTS)}")
    if rank is not None and rank <= 0:
        raise InputError(f"the LoRA rank must be positive; got {rank}")


def _write_report(out: Path, report: Mapping[str, Any]) -> None:
    write_bytes_atomic(out / REPORT_NAME, (json.dumps(report, indent=2) + "\n").encode("utf-8"))


def _short_warnings(task: str, modules: Mapping[str, Mapping[str, Any]]) -> list[str]:
    short = {n: m["rows_outside_null_space"] for n, m in modules.items() if m.get("rows_outside_null_space")}
    if not short:
        return []
    worst = max(short.values())
    return [f"task {task!r}: in {len(short)} module(s) the other tasks' mean features leave a null space smaller "
            f"than the LoRA rank (up to {worst} row(s) short); those rows use the least-used directions instead. "
            "Use --variant covariance or a smaller --rank for a strict null space."]


def osrm_init(base: str | Path, tasks: Mapping[str, str | Path], out: str | Path, *,
              target_modules: Sequence[str], rank: int, alpha: float | None = None,
              variant: str = "covariance", center: bool = False, only: Sequence[str] | None = None,
              lora_dropout: float = 0.0, save_dtype: torch.dtype = torch.float32,
              opts: CollectOptions = CollectOptions()) -> dict[str, Any]:
    """Write an OSRM-initialised PEFT LoRA adapter for each task into ``out/<task>/``.

    Args:
        base: base model directory (transformers format; its tokenizer, if any, reads text data).
        tasks: task name → unlabelled data file (text lines or JSONL), two tasks at least.
        out: output directory; also holds the statistics cache unless ``opts.stats_dir`` is set.
        target_modules: PEFT ``target_modules`` (suffixes of module names, or "all-linear").
        rank: LoRA rank r.
        alpha: LoRA alpha (default 2·r).
        variant: "covariance" (paper: smallest eigenvectors of the other tasks' pooled uncentred
            second moment) or "means" (null space of their mean features).
        center: subtract each task's mean from its second moment (ablation; covariance only).
        only: write adapters for these tasks only (statistics still come from all).
        lora_dropout: written into the adapter config for training.
        save_dtype: dtype of the saved factors.
        opts: how the model is run and where statistics are cached.

    Returns:
        The report (also written to ``out/osrm_report.json``).
    """
    _check_method(variant, rank)
    base, out = Path(base), Path(out)
    task_paths = {name: Path(p) for name, p in tasks.items()}
    check_tasks(task_paths)
    if len(task_paths) < 2:
        raise InputError(f"OSRM needs at least two tasks (each task's A is fitted to the others' data); "
                         f"got {sorted(task_paths)}")
    chosen = list(only) if only else list(task_paths)
    unknown = [t for t in chosen if t not in task_paths]
    if unknown:
        raise InputError(f"--only names {unknown}, which are not among the tasks {list(task_paths)}")
    meta = meta_model(base, opts.backbone)
    infos = resolve_target_modules(meta, target_modules)
    task_type = "CAUSAL_LM" if type(meta).__name__.endswith("ForCausalLM") else None
    del meta
    stats_dir = Path(opts.stats_dir) if opts.stats_dir else out / STATS_DIR_NAME
    stats, gathered = gather_stats(base, task_paths, [i.name for i in infos], variant == "covariance", opts,
                                   stats_dir)
    device = _device(opts.device)
    alpha = float(2 * rank if alpha is None else alpha)
    adapters: dict[str, Any] = {}
    warnings: list[str] = []
    for task in chosen:
        others = [t for t in task_paths if t != task]
        tensors, modules = _init_factors(infos, stats, task, others, rank, variant, center, device, save_dtype)
        config = lora_init_config(str(base), target_modules, rank, alpha, fan_in_fan_out=infos[0].conv1d,
                                  task_type=task_type, lora_dropout=lora_dropout)
        info = {"method": "OSRM (arXiv 2505.22934)", "mode": "init", "task": task, "other_tasks": others,
                "variant": variant, "center": center, "rank": rank, "summary": _summary(modules), "modules": modules}
        write_adapter_dir(out / task, tensors, config, info)
        adapters[task] = {"path": str(out / task), **_summary(modules)}
        warnings += _short_warnings(task, modules)
    report = {"output": str(out), "stats_dir": str(stats_dir), "variant": variant, "center": center,
              "rank": rank, "target_modules": list(target_modules), **gathered.as_dict(), "adapters": adapters,
              "warnings": warnings}
    _write_report(out, report)
    return report


def _same_inputs(a: Sequence[ModuleStats], b: Sequence[ModuleStats]) -> bool:
    """Whether two modules saw identical inputs on every task (q/k/v, gate/up share theirs)."""
    return all(x.count == y.count and torch.equal(x.sum_x, y.sum_x)
               and (x.sum_xxT is None) == (y.sum_xxT is None)
               and (x.sum_xxT is None or torch.equal(x.sum_xxT, y.sum_xxT)) for x, y in zip(a, b))


def _init_factors(infos: Sequence[ModuleInfo], stats: Mapping[str, TaskStats], task: str, others: Sequence[str],
                  rank: int, variant: str, center: bool, device: torch.device,
                  save_dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    modules: dict[str, Any] = {}
    previous: tuple[list[ModuleStats], Subspace, dict[str, Any]] | None = None
    for info in infos:
        other = [_on(stats[o].modules[info.name], device) for o in others]
        own = _on(stats[task].modules[info.name], device)
        if previous is not None and _same_inputs(previous[0], [*other, own]):
            # Modules fed the same tensor (adjacent in model order) get the same subspace: one eigh.
            sub, report = previous[1], dict(previous[2])
        else:
            sub = _subspace(variant, other, rank, center)
            report = _module_report(sub, other, own, variant, center)
        previous = ([*other, own], sub, report)
        tensors[lora_key(info.name, "lora_A")] = sub.A.to("cpu", save_dtype)
        tensors[lora_key(info.name, "lora_B")] = torch.zeros(info.out_features, rank, dtype=save_dtype)
        modules[info.name] = report
    return tensors, modules


def osrm_project(adapter: str | Path, base: str | Path, tasks: Mapping[str, str | Path], out: str | Path, *,
                 own: str | None = None, variant: str = "covariance", center: bool = False,
                 opts: CollectOptions = CollectOptions()) -> dict[str, Any]:
    """Project a trained LoRA adapter onto the OSRM subspace of the other tasks (post-hoc OSRM).

    Per linear module of rank r: ``A ← A_osrm`` (r smallest eigenvectors, as in ``osrm_init``)
    and ``B ← (s B A) A_osrmᵀ / s``, so ``ΔW ← ΔW A_osrmᵀ A_osrm``.  The adapter config and
    side files are copied unchanged; embedding LoRA and other tensors are kept as they are.

    Args:
        adapter: the trained PEFT LoRA adapter directory.
        base: its base model directory.
        tasks: task name → unlabelled data file; every task except ``own`` is an "other" task.
        out: the output adapter directory (its ``osrm.json`` reports per-module numbers); the
            statistics cache defaults to ``<out's parent>/.osrm_stats``, shared by sibling projections.
        own: the adapter's own task, if it is among ``tasks`` (excluded from the others).
        variant, center, opts: as for ``osrm_init``.
    """
    _check_method(variant)
    adapter, base, out = Path(adapter), Path(base), Path(out)
    task_paths = {name: Path(p) for name, p in tasks.items()}
    check_tasks(task_paths)
    if own is not None and own not in task_paths:
        raise InputError(f"--own {own!r} is not among the tasks {list(task_paths)}")
    others = [t for t in task_paths if t != own]
    if not others:
        raise InputError("osrm-project needs data of at least one task other than the adapter's own")
    if out.resolve() == adapter.resolve():
        raise InputError(f"the output {str(out)!r} is the input adapter; write the projection to a new directory")
    meta = meta_model(base, opts.backbone)
    names = {n for n, _ in meta.named_parameters(remove_duplicate=False)}
    problems: list[str] = []
    parsed = load_lora_adapter(adapter, names, problems)
    if problems:
        raise AdapterError(f"adapter {str(adapter)!r} does not fit the base model {str(base)!r}: " + "; ".join(problems))
    linear = [m for m in parsed.modules if not m.embedding]
    module_names = [m.target.removesuffix(".weight") for m in linear]
    modules_by_name(meta, module_names)
    del meta
    stats_dir = Path(opts.stats_dir) if opts.stats_dir else out.parent / STATS_DIR_NAME
    stats, gathered = gather_stats(base, task_paths, module_names, variant == "covariance", opts, stats_dir)
    device = _device(opts.device)

    from safetensors.torch import load_file

    tensors = load_file(str(adapter / ADAPTER_WEIGHTS_NAME))
    modules: dict[str, Any] = {}
    for m, name in zip(linear, module_names):
        A, B = tensors[m.a_key], tensors[m.b_key]
        other = [_on(stats[o].modules[name], device) for o in others]
        sub = _subspace(variant, other, A.shape[0], center)
        new_A, new_B = project_factors(A.to(device), B.to(device), sub.A)
        before = float(torch.trace((B.double().T @ B.double()) @ (A.double() @ A.double().T)))
        own_stats = _on(stats[own].modules[name], device) if own else None
        entry = _module_report(sub, other, own_stats, variant, center)
        entry["update_kept"] = float((new_B**2).sum()) / before if before > 0 else 1.0
        modules[name] = entry
        tensors[m.a_key], tensors[m.b_key] = new_A.to("cpu", A.dtype), new_B.to("cpu", B.dtype)
    copy_adapter_files(adapter, out)
    summary = _summary(modules)
    summary["update_kept_mean"] = sum(m["update_kept"] for m in modules.values()) / len(modules)
    info = {"method": "OSRM (arXiv 2505.22934)", "mode": "project", "source_adapter": str(adapter), "task": own,
            "other_tasks": others, "variant": variant, "center": center, "summary": summary, "modules": modules,
            "unchanged_modules": [m.module for m in parsed.modules if m.embedding]}
    write_adapter_dir(out, tensors, None, info)
    return {"output": str(out), "stats_dir": str(stats_dir), "variant": variant, "center": center,
            **gathered.as_dict(), **summary, "warnings": _short_warnings(own or str(adapter), modules)}
