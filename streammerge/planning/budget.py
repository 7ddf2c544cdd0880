"""The memory budget: what merging one tensor holds at once, the predicted peak of a job, and
the checks against ``--max-memory`` / ``--max-gpu-memory``.

The engine streams every merged tensor through fixed-size fp32 row blocks, so the working set
of a low-rank merge is the factors plus a few blocks, whatever the tensor's size.  Methods that
need dense deltas (TIES, DARE, Breadcrumbs, …) or dense inputs (full fine-tunes,
``modules_to_save``) hold whole fp32 copies of the tensor, which the estimate counts.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..io.dtypes import DTYPES
from ..io.reader import BLOCK_BYTES, COPY_CHUNK_BYTES
from ..inputs.kinds import KINDS
from ..methods import MergeMethod
from ..methods.rows import MODEL_CANDIDATE_LIMIT

if TYPE_CHECKING:
    from .plan import TensorJob

MiB = 2**20
# fp32 bytes of one row block. Fixed (not derived from the budget) so that the output bytes
# never depend on the memory limit a job ran under: BLAS may round differently per block shape.
# Output blocks or copy chunks queued for the background writer.
WRITE_QUEUE_DEPTH = 2
# Interpreter, torch, numpy and our modules, measured as the peak RSS of a merge of a tiny model.
PROCESS_BASELINE_BYTES = 320 * MiB
# Whole fp32 copies of a tensor a dense method holds at once: one input's delta while it is
# built, its |values| and masks, the running sum or vote, the agreement mask, the result and the
# allocator's slack.  Measured 2026-12-01 on the 1b preset (4 × r16, largest merged tensor
# 8192×2048 = 64 MiB fp32): TIES peaked at 978 MiB, i.e. ~7 copies over the baseline and blocks;
# Breadcrumbs holds ~1 copy more than TIES inside the method, DARE-TIES ~1 less.
DENSE_METHOD_COPIES = 7
# The whole-model pass of TIES ``scope: global`` keeps per input at most this many bytes of window entries
# (methods.rows.MODEL_CANDIDATE_LIMIT entries of 8 bytes, doubled while joined at the end).
MODEL_PASS_INPUT_BYTES = 16 * MODEL_CANDIDATE_LIMIT
# Factor bytes of the tensors a method with ``merge_many`` merges at once (worker ``_merge_ahead``). Fixed,
# like the block size: the window decides which problems are batched, so it must not depend on the budget.
LOOKAHEAD_BYTES = 32 * MiB
# What such windows hold at their peak, in windows: the loaded and weighted factors, the orthogonalized ones, the
# results, the batch's temporaries, and the next window in flight on the lookahead thread (its inputs and
# temporaries) while the current one's results wait (measured: DO-Merging on the 1b preset, 4 × r16, +140 MiB
# anonymous RSS inline, +270 MiB with the lookahead thread).
LOOKAHEAD_COPIES = 7


@dataclass(frozen=True)
class MemoryEstimate:
    """Predicted peaks: the whole process on the host, and the worker device's working set."""

    host_bytes: int
    device_bytes: int
    worst_tensor: str
    reason: str


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def block_numel(shape: tuple[int, ...]) -> int:
    """Elements in one row block of a tensor of ``shape`` (at least one row)."""
    if not shape:
        return 1
    row = _numel(shape[1:]) or 1
    rows = max(1, BLOCK_BYTES // (4 * row))
    return min(shape[0], rows) * row


def rows_per_block(shape: tuple[int, ...]) -> int:
    """Rows of one block (the engine's block partition)."""
    if not shape:
        return 1
    return max(1, BLOCK_BYTES // (4 * (_numel(shape[1:]) or 1)))


def streams_dense_rows(job: TensorJob, method: MergeMethod) -> bool:
    """Whether the engine merges ``job``'s inputs that need the base values (full fine-tunes, replaced
    tensors, DoRA) one row block at a time: the method is elementwise and no input is stored transposed."""
    return (method.elementwise and bool(job.shape) and not any(c.transposed for c in job.contributions)
            and any(KINDS[c.kind].needs_base_values for c in job.contributions))


def streams_method_rows(job: TensorJob, method: MergeMethod, params: Mapping[str, Any]) -> bool:
    """Whether the engine runs a dense method's two-pass row-block form on ``job`` (``MergeMethod.rows``):
    the method has one for these parameters, the tensor is a matrix, and no input is stored transposed."""
    form = method.rows
    return (form is not None and form.supports(params) and len(job.shape) == 2 and bool(job.contributions)
            and not any(c.transposed for c in job.contributions))


def lowrank_factor_bytes(job: TensorJob) -> int:
    """fp32 bytes of ``job``'s low-rank factors (``[d_out, r]`` and ``[r, d_in]`` per contribution)."""
    n = _numel(job.shape)
    d_out = job.shape[0] if job.shape else 1
    d_in = n // d_out if d_out else 0
    return 4 * sum((d_out + d_in) * c.rank for c in job.contributions if KINDS[c.kind].low_rank)


def tensor_working_set(job: TensorJob, method: MergeMethod,
                       params: Mapping[str, Any] | None = None) -> tuple[int, str]:
    """Bytes the worker device holds to merge ``job``, and why (``params``: the method's, for its row form)."""
    n = _numel(job.shape)
    out_size = DTYPES[job.out_dtype].bits // 8 or 1
    block = block_numel(job.shape)
    need = block * (4 + out_size)  # the fp32 block and its cast copy
    need += 3 * lowrank_factor_bytes(job)  # loaded factors, the method's intermediates, its concatenated result
    reasons = ["row blocks"]
    if method.merge_many is not None:
        need += LOOKAHEAD_COPIES * LOOKAHEAD_BYTES
        reasons.append("tensors merged ahead in a batch")
    if streams_dense_rows(job, method):
        # Row block by row block: the base rows, one delta per input, the merged rows.
        dense_inputs = {c.input_index for c in job.contributions if not KINDS[c.kind].low_rank}
        need += (len(dense_inputs) + 2) * 4 * block
        reasons.append(f"{len(dense_inputs)} dense input block(s)")
        return need, " + ".join(reasons)
    if params is not None and streams_method_rows(job, method, params):
        # Two passes over row blocks: base rows (merged in place), one delta block per dense input; per
        # input the method's histograms, window entries and grid-step temporaries (RowMerge.working_bytes).
        form = method.rows
        assert form is not None
        inputs = {c.input_index for c in job.contributions}
        dense_inputs = {c.input_index for c in job.contributions if not KINDS[c.kind].low_rank}
        # the base rows are the fp32 block above (merged in place); per dense input its delta rows
        need += len(dense_inputs) * 4 * block
        need += form.working_bytes(job.shape, len(inputs), params)
        if params.get("scope", "tensor") == "global":
            need += len(inputs) * MODEL_PASS_INPUT_BYTES
            reasons.append("the whole-model pass's window entries")
        reasons.append(f"two passes over row blocks ({len(dense_inputs)} dense input block(s))")
        return need, " + ".join(reasons)
    if method.reads_base or any(KINDS[c.kind].needs_base_values for c in job.contributions):
        need += 4 * n
        reasons.append("the whole fp32 base")
    if method.dense_inputs or any(not KINDS[c.kind].low_rank for c in job.contributions):
        need += DENSE_METHOD_COPIES * 4 * n
        reasons.append(f"{DENSE_METHOD_COPIES} dense fp32 copies")
    return need, " + ".join(reasons)


def estimate_memory(jobs: Iterable[TensorJob], method: MergeMethod,
                    params: Mapping[str, Any] | None = None) -> MemoryEstimate:
    """The predicted peak of a job: baseline + the largest working set + the writer queue."""
    worst, worst_name, worst_reason = 0, "", "byte copies"
    queue = WRITE_QUEUE_DEPTH * COPY_CHUNK_BYTES
    for job in jobs:
        if not job.contributions and job.dtype == job.out_dtype:
            continue
        need, reason = tensor_working_set(job, method, params)
        queue = max(queue, WRITE_QUEUE_DEPTH * block_numel(job.shape) * (DTYPES[job.out_dtype].bits // 8 or 1))
        if need > worst:
            worst, worst_name, worst_reason = need, f"{job.name} {list(job.shape)}", reason
    return MemoryEstimate(PROCESS_BASELINE_BYTES + worst + queue, worst, worst_name, worst_reason)


def budget_problems(estimate: MemoryEstimate, max_memory: int | None) -> list[str]:
    """A plan problem when the prediction exceeds ``--max-memory`` (with the numbers and the culprit)."""
    if max_memory is None or estimate.host_bytes <= max_memory:
        return []
    return [f"max_memory: the predicted peak is {estimate.host_bytes / MiB:,.0f} MiB but --max-memory is "
            f"{max_memory / MiB:,.0f} MiB; the largest working set is tensor {estimate.worst_tensor} "
            f"({estimate.reason}). Raise the limit, or use a low-rank method (task_arithmetic, do_merging, "
            "knots, tsv), which streams every tensor in row blocks"]
