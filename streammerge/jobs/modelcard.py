"""The README.md model card of a merged model or adapter: recipe, inputs with fingerprints and
Hub commits, library versions, per-module method statistics."""

from __future__ import annotations

import platform
from importlib import metadata
from typing import TYPE_CHECKING, Any

from ..recipe import dump_recipe_yaml, format_weight

if TYPE_CHECKING:
    from ..planning.plan import MergePlan
    from ..sinks.base import CardFacts
    from .report import MergeReport

VERSIONED_PACKAGES = ("streammerge", "torch", "safetensors", "huggingface_hub", "transformers", "peft")
# Per-module statistics tables list at most this many tensors (the aggregate covers all).
MAX_STAT_ROWS = 2000


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


def _front_matter(plan: MergePlan, facts: CardFacts) -> list[str]:
    hub = [s.repo_id for s in plan.sources if s.repo_id]
    lines = ["---", f"library_name: {facts.library_name}"]
    if facts.base_model_relation is None:  # an adapter of the base
        if plan.sources and plan.sources[0].repo_id:
            lines.append(f"base_model: {plan.sources[0].repo_id}")
    elif hub:
        lines += ["base_model:"] + [f"- {h}" for h in dict.fromkeys(hub)]
        lines.append(f"base_model_relation: {facts.base_model_relation}")
    lines += ["tags:", "- merge", "- streammerge", f"- {plan.recipe.method}"]
    lines += [f"- {tag}" for tag in facts.tags]
    return lines + ["---"]


def _inputs_table(plan: MergePlan) -> list[str]:
    sources = list(plan.sources) or [None] * (len(plan.inputs) + 1)
    base_src = sources[0]
    commit = f"`{base_src.commit}`" if base_src is not None and base_src.commit else ""
    lines = [
        "| # | kind | path or repo | Hub commit | weight | ranks | tensors changed | fingerprint (sha256 of shard sizes + headers) |",
        "|---|---|---|---|---|---|---|---|",
        f"| base | model | `{plan.recipe.base}` | {commit} | | | | `{plan.base_fingerprint}` |",
    ]
    for s in plan.inputs:
        src = sources[s.index + 1] if s.index + 1 < len(sources) else None
        commit = f"`{src.commit}`" if src is not None and src.commit else ""
        ranks = ",".join(map(str, s.ranks)) or "-"
        lines.append(f"| {s.index} | {s.kind} | `{s.path}` | {commit} | {format_weight(s.weight)} | {ranks} | "
                     f"{s.tensors_changed} | `{s.fingerprint}` |")
    mapped = [f"- input {s.index}: {s.key_mapping}" for s in plan.inputs if s.key_mapping]
    return lines + (["", "Key mappings onto the base's tensor names:", "", *mapped] if mapped else [])


def _stats_tables(stats: dict[str, dict[str, float]]) -> list[str]:
    aggregated = _aggregate(stats)
    if not aggregated:
        return []
    lines = ["", "## Method statistics", "", "Over all merged tensors:", "",
             "| statistic | min | mean | max |", "|---|---|---|---|"]
    for key, v in sorted(aggregated.items()):
        lines.append(f"| {key} | {v['min']:.4g} | {v['mean']:.4g} | {v['max']:.4g} |")
    keys = sorted(aggregated)
    rows = sorted(stats.items())[:MAX_STAT_ROWS]
    lines += ["", "<details><summary>Per module</summary>", "",
              "| tensor | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for name, values in rows:
        cells = " | ".join(f"{values[k]:.4g}" if k in values else "" for k in keys)
        lines.append(f"| {name} | {cells} |")
    if len(stats) > MAX_STAT_ROWS:
        lines.append(f"| … {len(stats) - MAX_STAT_ROWS} more | |")
    return lines + ["", "</details>"]


def render_model_card(plan: MergePlan, report: MergeReport, facts: CardFacts) -> str:
    """Markdown with YAML front matter, as the Hugging Face Hub expects; ``facts`` come from the output's sink."""
    recipe = plan.recipe
    lines = [
        *_front_matter(plan, facts),
        "",
        f"# {facts.title} ({recipe.method})",
        "",
        f"Made with streammerge {_version('streammerge')} from the base model `{recipe.base}` and "
        f"{len(recipe.inputs)} input(s) with the `{recipe.method}` method{facts.sentence}.",
        "",
        *facts.usage,
        "",
        "## Inputs",
        "",
        *_inputs_table(plan),
        "",
        "## Recipe",
        "",
        "The resolved recipe (method parameters spelled out, Hub revisions pinned); "
        "`streammerge merge streammerge_recipe.json --out DIR` re-runs it.",
        "",
        "```yaml",
        dump_recipe_yaml(plan.resolved_recipe()).rstrip(),
        "```",
        "",
        f"Plan fingerprint: `{plan.fingerprint()}`",
        "",
        "## Job",
        "",
        f"- tensors merged: {report.tensors_merged}, copied unchanged: {report.tensors_copied}",
        f"- output: {len(report.files)} weight file(s), {report.bytes_written:,} bytes",
        f"- device: {report.device}; wall time {report.seconds:.1f} s; peak RSS {report.peak_rss / 2**20:,.0f} MiB "
        f"({report.peak_anon_rss / 2**20:,.0f} MiB anonymous)",
        "- versions: " + ", ".join(f"{p} {_version(p)}" for p in VERSIONED_PACKAGES)
        + f", python {platform.python_version()}",
    ]
    lines += _stats_tables(report.stats)
    lines += ["", "## Files", "", "| file | bytes | sha256 |", "|---|---|---|"]
    lines += [f"| {r.file_name} | {r.size:,} | `{r.sha256}` |" for r in report.files]
    return "\n".join(lines) + "\n"


def stats_summary(stats: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Per-statistic min/mean/max over tensors (for the CLI summary)."""
    return _aggregate(stats)
