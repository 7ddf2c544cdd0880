"""Exact per-row order statistics of ``|x|`` and the band they bound: Breadcrumbs' per-row band.

``largest_per_row(rows, ranks)`` gives, for each rank ``k``, every row's ``k``-th largest ``|x|``: the values
an unsorted ``topk`` per row gives, at about two thirds of its cost on CPU (~4.2 instead of ~6.5 ns per
entry on one core, for Breadcrumbs' two ranks on 1 MiB grid steps of LoRA products).  ``keep_between_``
then zeroes the entries outside ``[low, high]`` per row, with the bytes of a bool-mask multiply.

Non-negative fp32 values order like their int32 bit patterns, and the top bits of a pattern are a
logarithmic scale: ``bits >> BUCKET_SHIFT`` is a bucket 1/32 of an octave wide.  Per row, one ``bincount``
of the ``BUCKETS`` buckets from the row's maximum down (8 octaves; lower entries share the last bucket)
says which bucket holds each answer and how many entries lie above it.  Only the entries of those
buckets (~1 % of a row of a LoRA product) are gathered, keyed ``row · 2^32 + bits`` and sorted, and each
answer is read off at its rank inside its bucket.  Every step runs over all rows at once (integer
arithmetic, one ``bincount``, one sort of the gathered entries); rows whose answer lies in the shared
last bucket (more than 8 octaves below the row's maximum: mostly zeros, or a huge outlier) take
``topk``, as do short rows and dtypes other than fp32.  The answers are exact, so they are the same
whichever way a row takes, on any device.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["BUCKET_SHIFT", "BUCKETS", "CHUNK_ENTRIES", "SHORTEST_ROW", "GROUP", "largest_per_row",
           "largest_by_topk", "keep_between_", "scratch_entries"]

BUCKET_SHIFT = 18
"""A bucket is the int32 bit pattern shifted right by this: 5 mantissa bits kept, 32 buckets per octave."""
BUCKETS = 256
"""Buckets per row from the row maximum's down; entries below the last one join it."""
CHUNK_ENTRIES = 1 << 18
"""Rows are taken about this many entries at a time (the temporaries stay cache-sized)."""
SHORTEST_ROW = 2 * BUCKETS
"""Rows shorter than this take ``topk``: the histogram would cost more than the entries."""
GROUP = 32
"""Finding the gathered entries scans the minima of groups of this many entries first (``_zeros_of``)."""
_SIGN_OFF = 0x7FFFFFFF


def scratch_entries(shape: tuple[int, int]) -> int:
    """int32 entries of the ``scratch`` that ``largest_per_row`` uses for rows of ``shape``."""
    rows, columns = shape
    return 2 * min(rows, max(1, CHUNK_ENTRIES // max(columns, 1))) * columns


def largest_by_topk(magnitude: torch.Tensor, ranks: Sequence[int]) -> list[torch.Tensor]:
    """Each row's ``k``-th largest of the 2-D ``magnitude`` for each ``k`` in ``ranks`` (``[rows, 1]`` each), from
    one unsorted ``topk`` of the largest rank per row (a selection, no sort)."""
    top = magnitude.topk(max(ranks), dim=-1, sorted=False).values
    return [(top if k == top.shape[-1] else top.topk(k, dim=-1, sorted=False).values).amin(dim=-1, keepdim=True)
            for k in ranks]


def largest_per_row(rows: torch.Tensor, ranks: Sequence[int], scratch: torch.Tensor | None = None
                    ) -> list[torch.Tensor]:
    """For each ``k`` in ``ranks``, the ``k``-th largest ``|x|`` of every row of the 2-D ``rows``
    (``1 <= k <= columns``), as ``[rows, 1]`` tensors of its dtype.

    Args:
        rows: the values (not overwritten).
        ranks: the ranks wanted, each counted from the largest (1: the maximum).
        scratch: int32, at least ``scratch_entries(rows.shape)`` entries, reused between calls (a fresh
            tensor per call costs page faults); allocated here when None.
    """
    count, columns = rows.shape
    if rows.dtype != torch.float32:
        return largest_by_topk(rows.abs(), ranks)
    bits = rows.view(torch.int32)  # |x| as bits & 0x7FFFFFFF: they order like |x| (Inf, then NaN, above all)
    if columns < SHORTEST_ROW or count == 0:
        return [answer.view(torch.float32) for answer in largest_by_topk(bits & _SIGN_OFF, ranks)]
    if scratch is None or scratch.numel() < scratch_entries((count, columns)):
        scratch = torch.empty(scratch_entries((count, columns)), dtype=torch.int32, device=rows.device)
    step = max(1, CHUNK_ENTRIES // columns)
    answers = torch.cat([_by_buckets(bits[lo:lo + step], ranks, scratch) for lo in range(0, count, step)])
    return [answers[:, i:i + 1].view(torch.float32) for i in range(len(ranks))]


def _by_buckets(bits: torch.Tensor, ranks: Sequence[int], scratch: torch.Tensor) -> torch.Tensor:
    """``largest_per_row`` on the int32 bit patterns ``bits`` of one chunk of rows: ``[rows, len(ranks)]``."""
    rows, columns = bits.shape
    device = bits.device
    entries = rows * columns
    offsets = torch.arange(0, rows * BUCKETS, BUCKETS, dtype=torch.int32, device=device).view(rows, 1)
    # Each entry's bucket counted from its row's top one (0) down, moved to the row's own BUCKETS bins;
    # entries below the last bucket join it.
    bucket = torch.bitwise_and(bits, _SIGN_OFF, out=scratch[:entries].view(rows, columns)).bitwise_right_shift_(
        BUCKET_SHIFT)
    top = bucket.amax(dim=1, keepdim=True)  # the row maximum's absolute bucket number
    torch.sub(top + offsets, bucket, out=bucket)
    torch.minimum(bucket, offsets + (BUCKETS - 1), out=bucket)
    counts = torch.bincount(bucket.view(-1), minlength=rows * BUCKETS).view(rows, BUCKETS)
    from_top = counts.cumsum(1)  # entries in this bucket or above it
    wanted = torch.tensor(list(ranks), device=device).expand(rows, len(ranks)).contiguous()
    target = torch.searchsorted(from_top, wanted)  # [rows, ranks]: the bucket holding the answer
    size = counts.gather(1, target)
    need = wanted - from_top.gather(1, target) + size  # the answer's rank inside its bucket, from its top
    missed = (target == BUCKETS - 1).any(dim=1, keepdim=True)  # the last bucket holds lower entries too
    # Zero at the entries of the answers' buckets: a product of differences, each |.| < 2 BUCKETS (from the
    # third on clamped to [-1, 1]: no overflow); the rows that take topk aim past every bucket.
    aim = torch.where(missed, -BUCKETS, target).to(torch.int32) + offsets
    hit = bucket.sub_(aim[:, :1])
    other = scratch[entries:2 * entries].view(rows, columns)
    for i in range(1, aim.shape[1]):
        difference = torch.sub(hit, aim[:, i:i + 1] - aim[:, :1], out=other)
        hit.mul_(difference if i == 1 else difference.clamp_(-1, 1))
    flat = _zeros_of(hit)
    ordered = ((torch.div(flat, columns, rounding_mode="floor") << 32) | (bits.reshape(-1)[flat] & _SIGN_OFF)).sort()
    ordered = ordered.values
    answers = torch.zeros(rows, len(ranks), dtype=torch.int32, device=device)
    if ordered.numel():
        last = ((top - target + 1) << BUCKET_SHIFT) - 1  # the largest pattern in the answer's bucket
        query = (torch.arange(rows, device=device).view(rows, 1) << 32) | last
        end = torch.searchsorted(ordered, query.view(-1), right=True).view(rows, -1)  # just past that bucket
        answers = (ordered[(end - need).clamp_(0, ordered.numel() - 1)] & _SIGN_OFF).to(torch.int32)
    if bool(missed.any()):
        which = missed.view(-1).nonzero().view(-1)
        answers[which] = torch.cat(largest_by_topk(bits[which] & _SIGN_OFF, ranks), dim=1)
    return answers


def _zeros_of(values: torch.Tensor) -> torch.Tensor:
    """Flat positions of the zeros of the int32 ``values`` (overwritten).  ``nonzero`` scans ~0.9 ns per entry on
    CPU however few it finds; here it scans the minima of ``|x|`` over groups, then the groups holding a zero."""
    flat = values.view(-1)
    if flat.numel() % GROUP:
        return (flat == 0).nonzero().view(-1)
    groups = flat.abs_().view(-1, GROUP)
    chosen = (groups.amin(dim=1) == 0).nonzero().view(-1)
    inside = (groups.index_select(0, chosen) == 0).nonzero()
    return chosen[inside[:, 0]] * GROUP + inside[:, 1]


def keep_between_(rows: torch.Tensor, low: torch.Tensor, high: torch.Tensor, scratch: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """``rows.mul_((|rows| >= low) & (|rows| <= high))``: the same bytes, at about half its cost on CPU.

    ``low`` and ``high`` are per row (``[rows, 1]``).  For fp32 rows and bounds in ``[+0, +Inf]`` the test runs
    on the sign-cleared bit patterns in integer arithmetic (``min(bits - low, high - bits) >= 0``: float
    compares into bool masks cost ~0.45 ns per entry each on CPU), into ``scratch`` (int32, at least
    ``scratch_entries(rows.shape)``); a NaN ``|x|`` is outside as before, and the multiply is the same.
    """
    count, columns = rows.shape
    if (rows.dtype != torch.float32 or low.dtype != torch.float32 or high.dtype != torch.float32
            or not bool(((low >= 0) & (high >= 0)).all())):  # e.g. (Inf, -Inf): nothing kept; NaN bounds
        magnitude = rows.abs()
        return rows.mul_((magnitude >= low) & (magnitude <= high))
    if scratch is None or scratch.numel() < scratch_entries((count, columns)):
        scratch = torch.empty(scratch_entries((count, columns)), dtype=torch.int32, device=rows.device)
    bits, low_bits, high_bits = rows.view(torch.int32), low.view(torch.int32), high.view(torch.int32)
    step = max(1, CHUNK_ENTRIES // max(columns, 1))
    for lo in range(0, count, step):
        hi = min(lo + step, count)
        entries = (hi - lo) * columns
        above_low = torch.bitwise_and(bits[lo:hi], _SIGN_OFF, out=scratch[:entries].view(hi - lo, columns))
        below_high = torch.sub(high_bits[lo:hi], above_low, out=scratch[entries:2 * entries].view(hi - lo, columns))
        inside = torch.minimum(above_low.sub_(low_bits[lo:hi]), below_high, out=above_low)  # >= 0: kept
        keep = below_high.view(torch.float32).copy_(inside.bitwise_right_shift_(31).add_(1))  # 1.0 or 0.0
        rows[lo:hi].mul_(keep)
    return rows
