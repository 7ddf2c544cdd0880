"""What a plan will do, in words: what is read, merged, copied and written, and what it costs.

The time estimate is deliberately rough: bytes moved at disk speed, merge arithmetic at a
per-element rate, and for iterative methods (a ``steps`` parameter, e.g. DO-Merging's
orthogonalization) a cost per step per side of each merged matrix: a fixed overhead (a dozen
small ops) plus its arithmetic (two ``[Σr, Σr]``×``[Σr, k]`` GEMMs and ~12 passes over the
``[Σr, k]`` state; ``k = Σr`` in the row-space search, ``d`` in the full one).  The rate
constants come from runs on the shared 2-core CPU VM (``tools/synthetic.py`` presets ``small``
and ``1b``, 2026-11-22 and 2026-12-01); a GPU worker, an idle machine or a cold disk changes the
answer by several times either way.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ..methods import get_method
from .plan import MergePlan
from ..recipe import format_weight

__all__ = ["describe_plan", "estimate_seconds", "free_disk_bytes"]

READ_BYTES_PER_S = 1.0e9
WRITE_BYTES_PER_S = 0.6e9
# fp32 elements of merged tensors per second: low-rank methods (one GEMM per row block) and
# dense methods (per input: a dense delta, sorts, elections), CPU worker.
LOW_RANK_ELEMENTS_PER_S = 1.0e7
DENSE_ELEMENTS_PER_S = 2.7e6
# Iterative methods, per optimisation step and side: fixed overhead, GEMM and elementwise rates.
STEP_OVERHEAD_S = 6e-5
STEP_FLOPS_PER_S = 4e10
STEP_ELEMENTS_PER_S = 1e9


def _step_seconds(total_rank: int, width: int) -> float:
    """One Adam step of one side: ``total_rank`` = Σr stacked rows of ``width`` columns."""
    return (STEP_OVERHEAD_S + 4 * total_rank * total_rank * width / STEP_FLOPS_PER_S
            + 12 * total_rank * width / STEP_ELEMENTS_PER_S)


def format_size(n: float) -> str:
    """Bytes for a person: 1.50 GiB, 12.00 MiB, 512 B."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def _elements(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def estimate_seconds(plan: MergePlan, output_bytes: int) -> float:
    """Rough wall time of the job (see the module docstring for what it assumes)."""
    method = get_method(plan.recipe.method)
    params = dict(plan.method_params)
    jobs = plan.tensors
    read = sum(t.out_bytes if t.is_copy else _elements(t.shape) * 2 for t in jobs)
    read += sum(s.bytes_read for s in plan.inputs)
    merged = [t for t in jobs if t.contributions]
    if method.dense_inputs:
        work = sum(_elements(t.shape) * len({c.input_index for c in t.contributions}) for t in merged)
        seconds = work / DENSE_ELEMENTS_PER_S * (2 if params.get("scope") == "global" else 1)  # + the first pass
    else:
        seconds = sum(_elements(t.shape) for t in merged) / LOW_RANK_ELEMENTS_PER_S
    if isinstance(params.get("steps"), int) and params.get("orthogonalize", True):
        svd_rank = int(params.get("svd_rank", 64))
        for t in merged:
            if len(t.shape) != 2 or len({c.input_index for c in t.contributions}) < 2:
                continue
            total_rank = sum(c.rank or svd_rank for c in t.contributions)
            for width in t.shape:  # the B side spans d_out, the A side d_in
                k = width if params.get("search_space") == "full" else min(total_rank, width)
                seconds += params["steps"] * _step_seconds(total_rank, k)
    return seconds + read / READ_BYTES_PER_S + output_bytes / WRITE_BYTES_PER_S


def free_disk_bytes(path: str | Path) -> int:
    """Free bytes on the file system that holds ``path`` (or its nearest existing parent)."""
    target = Path(path).resolve()
    while not target.exists() and target != target.parent:
        target = target.parent
    return shutil.disk_usage(target).free


def describe_plan(plan: MergePlan, output_line: str, output_bytes: int) -> str:
    """A few lines a person reads before a long job starts.

    Args:
        plan: the plan.
        output_line: the output format's own line (``Sink.describe``).
        output_bytes: about how many bytes the output will hold (``Sink.output_bytes``).
    """
    recipe = plan.recipe
    jobs = plan.tensors
    copied = sum(1 for t in jobs if t.is_copy)
    cast = sum(1 for t in jobs if not t.is_copy and not t.contributions)
    base_src = plan.sources[0] if plan.sources else None
    lines = [f"method {recipe.method} {dict(plan.method_params)}",
             f"read: base {recipe.base}" + (f" (Hub commit {base_src.commit}, {base_src.local_path})"
                                            if base_src and base_src.commit else "")]
    for s in plan.inputs:
        src = plan.sources[s.index + 1] if len(plan.sources) > s.index + 1 else None
        hub = f", Hub commit {src.commit}" if src and src.commit else ""
        own = recipe.inputs[s.index].params if s.index < len(recipe.inputs) else ()
        own_text = "".join(f", {name} {format_weight(value)}" for name, value in own)
        lines.append(f"  input {s.index}: {s.kind} {s.path} (weight {format_weight(s.weight)}{own_text}, "
                     f"{s.tensors_changed} tensors, {format_size(s.bytes_read)} read"
                     + (f", ranks {list(s.ranks)}" if s.ranks else "") + hub + ")"
                     + (f"\n    {s.key_mapping}" if s.key_mapping else ""))
    lines.append(f"merge: {plan.merged_count} tensors; copy unchanged: {copied}"
                 + (f"; cast only: {cast}" if cast else ""))
    if plan.chat_template is not None:
        lines.append(f"chat template: written into the tokenizer files ({len(plan.chat_template)} characters)")
    if dict(plan.method_params).get("scope") == "global":
        lines.append(f"first pass (scope global): each input's top density over the {plan.merged_count} merged tensors, "
                     "statistics only; journaled, so a resumed job does not run it again")
    lines.append(output_line)
    disk = f"disk: {format_size(output_bytes)} needed"
    if recipe.out:
        free = free_disk_bytes(recipe.out)
        disk += f", {format_size(free)} free at {recipe.out}" + ("" if free >= output_bytes else " (NOT ENOUGH)")
    lines += [f"memory: predicted peak memory {format_size(plan.estimated_peak_bytes)}", disk,
              f"time: roughly {estimate_seconds(plan, output_bytes):.0f} s on a 2-core CPU (much less on a GPU worker)"]
    return "\n".join(lines)
