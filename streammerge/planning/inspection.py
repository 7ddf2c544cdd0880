"""``streammerge inspect``: what a model or adapter directory holds, and whether it fits a base.

Reads configs and safetensors headers only (never tensor data).  The report is plain data
(JSON-ready); ``render_inspection`` turns it into the text the CLI prints.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from ..inputs.lora import load_lora_adapter
from ..errors import PlanError, StreamMergeError
from ..inputs.hub import resolve_source
from ..io.reader import CheckpointLayout
from ..names import ADAPTER_CONFIG_NAME
from ..inputs.base_formats import base_format_of
from .contributions import count_layers
from .plan import plan_merge
from ..recipe import InputSpec, Recipe

__all__ = ["inspect_path", "render_inspection"]

_MODEL_CONFIG_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                      "vocab_size", "tie_word_embeddings", "torch_dtype", "dtype")


class _AnyName:
    """Stands in for a base's tensor names when there is no base: every adapter module maps to itself."""

    def __contains__(self, name: object) -> bool:
        return True


def _tensors(layout: CheckpointLayout) -> dict[str, Any]:
    infos = [h.tensors[n] for h in layout.headers.values() for n in h.tensors]
    return {"count": len(infos), "bytes": sum(t.nbytes for t in infos),
            "dtypes": dict(Counter(t.dtype for t in infos).most_common()), "files": len(layout.shards)}


def _inspect_adapter(root: Path) -> dict[str, Any]:
    problems: list[str] = []
    adapter = load_lora_adapter(root, _AnyName(), problems)
    s = adapter.settings
    return {
        "kind": "adapter",
        "peft_type": "LORA",
        "base_model_name_or_path": s.base_model_name_or_path,
        "base_model_class": s.base_model_class,
        "r": s.r, "lora_alpha": s.lora_alpha, "use_rslora": s.use_rslora, "fan_in_fan_out": s.fan_in_fan_out,
        "lora_bias": s.lora_bias, "modules_to_save": list(s.modules_to_save),
        "modules": len(adapter.modules),
        "target_modules": sorted({m.module.rsplit(".", 1)[-1] for m in adapter.modules}),
        "embedding_modules": sorted(m.module for m in adapter.modules if m.embedding),
        "ranks": {str(k): v for k, v in sorted(Counter(m.rank for m in adapter.modules).items())},
        "scalings": {f"{k:g}": v for k, v in sorted(Counter(m.scale for m in adapter.modules).items())},
        "other_tensors": dict(Counter(t.kind for t in adapter.tensors)),
        "tensors": _tensors(adapter.weights),
        "warnings": problems,
    }


def _inspect_model(root: Path) -> dict[str, Any]:
    fmt = base_format_of(root)
    layout = fmt.open(root)
    config = fmt.config(layout)
    return {
        "kind": "model",
        "format": fmt.name,
        "architecture": (config.get("architectures") or [None])[0],
        **{k: config[k] for k in _MODEL_CONFIG_KEYS if k in config},
        "num_layers": count_layers(config, layout.shard_of),
        "tensors": _tensors(layout),
        "sharded": layout.index_path is not None,
    }


def _compatibility(report: dict[str, Any], reference: str, revision: str | None, base: str,
                   base_revision: str | None) -> None:
    recipe = Recipe(base=base, revision=base_revision, device="cpu",
                    inputs=(InputSpec(path=reference, kind=report["kind"], revision=revision),))
    try:
        plan = plan_merge(recipe)
    except PlanError as e:
        report.update(compatible=False, problems=e.problems)
        return
    summary = plan.inputs[0]
    report.update(compatible=True, problems=[], tensors_changed=summary.tensors_changed,
                  base_tensors=plan.tensor_count)


def inspect_path(reference: str, base: str | None = None, revision: str | None = None,
                 base_revision: str | None = None) -> dict[str, Any]:
    """Describe a model or adapter (local path or Hub repo id); with ``base``, check that they fit.

    Raises:
        StreamMergeError: the path cannot be resolved or read at all.
    """
    source = resolve_source(reference, revision)
    root = Path(source.local_path)
    report: dict[str, Any] = {"path": reference, "local_path": str(root)}
    if source.commit:
        report["hub_commit"] = source.commit
    try:
        details = _inspect_adapter(root) if (root / ADAPTER_CONFIG_NAME).is_file() else _inspect_model(root)
    except StreamMergeError as e:
        if not (root / ADAPTER_CONFIG_NAME).is_file():
            raise
        details = {"kind": "adapter", "supported": False, "reason": str(e)}
    report.update(details)
    if base is not None:
        report["base"] = base
        _compatibility(report, reference, revision, base, base_revision)
    return report


def _size(n: int) -> str:
    return f"{n / 2**20:,.2f} MiB" if n >= 2**20 else f"{n:,} B"


def render_inspection(report: dict[str, Any]) -> str:
    """The report as a few readable lines."""
    lines = [f"{report['path']}: {report['kind']}" + (f" (Hub commit {report['hub_commit']})"
                                                      if report.get("hub_commit") else "")]
    if report.get("supported") is False:
        lines.append(f"  not mergeable: {report['reason']}")
    t = report.get("tensors")
    if t:
        dtypes = ", ".join(f"{k} x{v}" for k, v in t["dtypes"].items())
        lines.append(f"  tensors: {t['count']} in {t['files']} file(s), {_size(t['bytes'])}; dtypes {dtypes}")
    if report["kind"] == "model" and "tensors" in report:
        lines.append(f"  architecture: {report.get('architecture')} ({report.get('model_type')}), "
                     f"{report['num_layers']} layers, hidden {report.get('hidden_size')}, "
                     f"vocab {report.get('vocab_size')}, tied embeddings {report.get('tie_word_embeddings')}")
    elif "modules" in report:
        lines += [
            f"  LoRA: r={report['r']} alpha={report['lora_alpha']:g} rslora={report['use_rslora']} "
            f"fan_in_fan_out={report['fan_in_fan_out']} lora_bias={report['lora_bias']}",
            f"  {report['modules']} modules; targets {report['target_modules']}; ranks {report['ranks']}; "
            f"scalings {report['scalings']}",
            f"  made for {report.get('base_model_class') or '?'} ({report.get('base_model_name_or_path') or '?'})",
        ]
        if report["embedding_modules"]:
            lines.append(f"  embedding LoRA on {report['embedding_modules']}")
        if report["other_tensors"] or report["modules_to_save"]:
            lines.append(f"  also: {report['other_tensors']} modules_to_save {report['modules_to_save']}")
        lines += [f"  warning: {w}" for w in report["warnings"]]
    if "compatible" in report:
        if report["compatible"]:
            lines.append(f"  fits base {report['base']}: changes {report['tensors_changed']} of "
                         f"{report['base_tensors']} tensors")
        else:
            lines.append(f"  does NOT fit base {report['base']}:")
            lines += [f"    - {p}" for p in report["problems"]]
    return "\n".join(lines)
