"""The README.md model card of a merged model: recipe, inputs with fingerprints, versions, stats."""

from __future__ import annotations

import json
import platform
from importlib import metadata
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .engine import MergeReport
    from .plan import MergePlan


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _aggregate(stats: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    values: dict[str, list[float]] = {}
    for per_tensor in stats.values():
        for key, value in per_tensor.items():
            values.setdefault(key, []).append(float(value))
    return {k: {"min": min(v), "mean": sum(v) / len(v), "max": max(v)} for k, v in values.items()}


def render_model_card(plan: MergePlan, report: MergeReport) -> str:
    """Markdown with YAML front matter, as the Hugging Face Hub expects."""
    recipe = plan.recipe
    lines = [
        "---",
        "library_name: transformers",
        "tags:",
        "- merge",
        "- streammerge",
        f"- {recipe.method}",
        "---",
        "",
        f"# Merged model ({recipe.method})",
        "",
        f"Made with [streammerge](https://github.com/) {_version('streammerge')} from the base model "
        f"`{recipe.base}` and {len(recipe.inputs)} input(s).",
        "",
        "## Inputs",
        "",
        "| # | kind | path | weight | ranks | tensors changed | fingerprint (sha256 of shard sizes + headers) |",
        "|---|---|---|---|---|---|---|",
        f"| base | model | `{recipe.base}` | | | | `{plan.base_fingerprint}` |",
    ]
    for s in plan.inputs:
        ranks = ",".join(map(str, s.ranks)) or "-"
        lines.append(f"| {s.index} | {s.kind} | `{s.path}` | {s.weight:g} | {ranks} | {s.tensors_changed} | `{s.fingerprint}` |")
    lines += [
        "",
        "## Recipe",
        "",
        "```json",
        json.dumps({**recipe.to_dict(), "resolved_params": dict(plan.method_params)}, indent=2, default=str),
        "```",
        "",
        f"Plan fingerprint: `{plan.fingerprint()}`",
        "",
        "## Job",
        "",
        f"- tensors merged: {report.tensors_merged}, copied unchanged: {report.tensors_copied}",
        f"- output: {len(report.shards)} shard(s), {report.bytes_written:,} bytes",
        f"- device: {report.device}; wall time {report.seconds:.1f} s; peak RSS {report.peak_rss / 2**20:,.0f} MiB",
        f"- versions: streammerge {_version('streammerge')}, torch {_version('torch')}, "
        f"safetensors {_version('safetensors')}, python {platform.python_version()}",
    ]
    aggregated = _aggregate(report.stats)
    if aggregated:
        lines += ["", "## Method statistics (over merged tensors)", "", "| statistic | min | mean | max |", "|---|---|---|---|"]
        for key, v in sorted(aggregated.items()):
            lines.append(f"| {key} | {v['min']:.4g} | {v['mean']:.4g} | {v['max']:.4g} |")
    lines += ["", "## Shards", "", "| file | bytes | sha256 |", "|---|---|---|"]
    lines += [f"| {r.file_name} | {r.size:,} | `{r.sha256}` |" for r in report.shards]
    return "\n".join(lines) + "\n"


def stats_summary(stats: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Per-statistic min/mean/max over tensors (for the CLI summary)."""
    return _aggregate(stats)
