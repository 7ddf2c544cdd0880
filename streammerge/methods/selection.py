"""Exact top-``k`` by ``|value|`` over row blocks: a window pass, else a two-level radix select.

Usually one pass suffices (the window pass): a first look (a few rows spread over the tensor, or
the first block) predicts the range of ``|δ|`` where the k-th largest lies; the pass counts the
entries above that window and keeps the ones inside it (value bits and row), using two
``hardshrink``s and one ``nonzero`` per block — float arithmetic, several times cheaper on CPU
than a histogram of every entry.  When the answer is among the kept entries the threshold is
found from them; a window that reaches 0 also finds a threshold among the zeros.

Otherwise the exact radix passes follow.  Non-negative fp32 values order like their int32 bit
patterns: the first counts the top 16 bits of every ``|δ|`` (32768 bins), which finds the bin
holding the k-th largest; the second counts the low 16 bits of the entries in that bin, which
gives the exact threshold ``t``.  The counts are integers, so they add up over blocks (and over
tensors, for ``scope: global``) in any order and the answer does not depend on the blocking.

Exactly ``k`` entries are kept: every ``|δ| > t`` and the first ties ``|δ| == t`` in flat index
order (row-major over a tensor, then over the segments in the order given).  Which ties those
are is a :class:`Threshold` per segment: ties in rows before ``tie_row`` are kept, in row
``tie_row`` the first ``tie_quota``, after it none.  The per-row tie counts come from the kept
entries of the window pass, or from the low-bits pass when the threshold's bin holds a single
value (the usual case for task vectors between bf16 models), otherwise from a third exact pass;
none is needed when every tie is kept.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass

import torch

__all__ = ["HIGH_BINS", "LOW_BINS", "Threshold", "KEEP_ALL", "KEEP_NONE", "TopKSelect", "keep_rows", "trim_rows",
           "window_entries"]

HIGH_BINS = 1 << 15
"""Bins of pass 1: bit patterns of non-negative fp32 values have 15 significant top bits."""
LOW_BINS = 1 << 16
"""Bins of pass 2: the low 16 bits."""
_LOW_MASK = LOW_BINS - 1
_INF_BITS = 0x7F800000


@dataclass(frozen=True)
class Threshold:
    """Which entries of one segment (tensor) a trim keeps.

    Attributes:
        value: ``t``; every ``|x| > t`` is kept.
        tie_row: entries with ``|x| == t`` are kept in rows before this one, none after it.
        tie_quota: in row ``tie_row``, the first this many ties (by column) are kept.
    """

    value: float
    tie_row: int
    tie_quota: int = 0


KEEP_ALL = Threshold(-1.0, 1 << 62)
"""Keeps every finite entry (``|x| > -1``)."""
KEEP_NONE = Threshold(float("inf"), -1)
"""Keeps nothing."""


def _float_of(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<i", bits))[0]


def _bit_rows(magnitude: torch.Tensor) -> torch.Tensor:
    """The int32 bit patterns of the non-negative fp32 ``magnitude`` rows (a view, no copy)."""
    assert magnitude.dtype == torch.float32, "selection runs on fp32 magnitudes"
    return magnitude.view(torch.int32)


def _locate(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """The bin holding the ``k``-th largest entry, and how many entries lie in higher bins."""
    above = hist.flip(0).cumsum(0).flip(0) - hist  # entries in strictly higher bins
    index = int(torch.nonzero((above < k) & (above + hist >= k))[0, 0])
    return index, int(above[index])


WINDOW_MARGIN = 0.01
"""The window pass keeps the entries whose top-16-bit bin lies within at least this share of ranks
(or 4σ) around the answer's rank as a first look predicts it, plus one bin either side."""
WIDEST_MARGIN = 0.015
"""The widest margin the room may buy.  What a window pass costs beyond its scan grows with the entries it
keeps (``nonzero`` writes ~20 ns per entry found, then the gather and the final selection): 0.03 kept ~7 %
of every tensor, half of pass 1's time on the 1b preset; the first look's error on the 1b preset's LoRA
products was ≤ 1.6 % of ranks (p95 1.0 %), so a wider margin buys few saved passes."""
CANDIDATE_LIMIT = 1 << 22
"""At most this many kept entries (8 bytes each) per selection; beyond it the window is dropped."""

def window_entries(size: int, candidate_limit: int = CANDIDATE_LIMIT) -> int:
    """About how many entries the window pass keeps for a selection over ``size`` entries (the widest margin
    the room buys, both sides, plus a bin either side), at most ``candidate_limit``."""
    margin = max(WINDOW_MARGIN, min(WIDEST_MARGIN, candidate_limit / (4 * max(size, 1))))
    return min(candidate_limit, int((2 * margin + 0.01) * size))


# Passes: the window pass (count above, keep the entries inside), then, only when the answer is not
# among the kept entries, the exact radix passes: top 16 bits of every entry, low 16 bits in the
# answer's bin, per-row tie counts.
_WINDOW, _HIGH, _LOW, _TIES = range(4)


class TopKSelect:
    """Exact selection of the ``k`` largest ``|x|`` over the row blocks of ordered segments.

    Feed every row block of every segment once per pass (``observe``), in any order, then call
    ``end_pass``; repeat while ``needs_pass()``.  ``threshold(name)`` then says what to keep.

    The first pass is a window pass: a first look (``hint``, else the first block observed)
    predicts the bins where the answer lies (``WINDOW_MARGIN``); the pass counts the entries above
    them and keeps those inside (bits and row) with two ``hardshrink``s and one ``nonzero`` — no
    histogram of every entry, which costs several times as much on CPU.  When the answer is among
    the kept entries the selection ends there; otherwise the exact radix passes follow.  The
    result is the same either way; only the number of passes depends on the data and order.

    Args:
        k: how many entries to keep over all segments (``0 <= k <= Σ numel``).
        segments: segment name → number of rows, in tie-breaking order; the columns per row
            are the last axis of the rows observed.
        size: total entries over all segments (for the first look).
        candidate_limit: most entries kept by the window pass (0: no window pass).
    """

    def __init__(self, k: int, segments: Mapping[str, int], size: int,
                 candidate_limit: int = CANDIDATE_LIMIT) -> None:
        self.k = k
        self.rows = dict(segments)
        self.size = size
        self.total = 0
        self._collecting = 0 < k < size and candidate_limit > 0
        self._pass = _WINDOW if self._collecting else _HIGH
        self._first = True  # the first pass also counts the entries
        self._high = torch.zeros(HIGH_BINS, dtype=torch.int64)
        self._low = torch.zeros(LOW_BINS, dtype=torch.int64)
        self._bin = 0
        self._above = 0
        self._bits = 0
        self._need = 0
        self._row_counts: dict[str, torch.Tensor] = {}
        self._thresholds: dict[str, Threshold] | None = None
        self._window: tuple[int, int] | None = None
        self._shrink = (0.0, 0.0)  # hardshrink λ of the window's bottom and top
        self._over = 0.0  # entries above the window
        self._over_rows: dict[str, torch.Tensor] = {}  # per row, when the window reaches 0
        self._columns: dict[str, int] = {}
        self._hinted: torch.Tensor | None = None
        self._sampled = 0
        self._room = candidate_limit
        self._kept: torch.Tensor | None = None  # [3, capacity] int32: row, |x| bits, segment of each kept entry
        self._used = 0
        self._segments: dict[str, int] = {}
        self._scratch: torch.Tensor | None = None  # the window pass's two shrunk copies of a block

    def needs_pass(self) -> bool:
        """True while another pass over the row blocks is needed."""
        return self._thresholds is None

    def hint(self, magnitude: torch.Tensor, represents: int | None = None) -> None:
        """A first look: a sample of ``|x|`` standing for ``represents`` entries (default: itself).

        Call it before the first ``observe``, once or once per segment (a few rows of each
        tensor, each standing for its tensor's size); the answer's bin is predicted from them all.
        """
        if not self._collecting or magnitude.numel() == 0:
            return
        high = torch.bincount((_bit_rows(magnitude.flatten()) >> 16), minlength=HIGH_BINS).cpu().double()
        high *= (represents or magnitude.numel()) / magnitude.numel()
        self._hinted = high if self._hinted is None else self._hinted.add_(high)
        self._sampled += magnitude.numel()

    def _predict(self, high: torch.Tensor, n: int) -> bool:
        """Choose the window from a first look's histogram ``high`` (``n`` entries); False when even the
        answer's predicted bin would not fit in the room (the window pass is then not worth it)."""
        q, total = self.k / self.size, max(1, int(high.sum()))
        # ≥ 4 sampling σ of the sample's quantile, and wider while the window is predicted to fill at most half
        # the room (rows of a task vector are not independent samples: a LoRA row's scale is shared).
        margin = max(WINDOW_MARGIN, 4 * math.sqrt(q * (1 - q) / n), min(WIDEST_MARGIN, self._room / (4 * self.size)))
        center = _locate(high, max(1, min(total, round(q * total))))[0]
        top = _locate(high, max(1, min(total, round((q - margin) * total))))[0] + 1
        bottom = _locate(high, max(1, min(total, round((q + margin) * total))))[0] - 1
        # Predicted entries per bin; spikes of tied values (task vectors between bf16 models) can hold
        # several percent of a tensor: shrink the window from its heavier end until it fits the room.
        counts = (high.double() * (self.size / total)).tolist()
        budget = self._room
        predicted = sum(counts[max(bottom, 0):top + 1])
        while predicted > budget and (bottom < center or top > center):
            if bottom < center and (top == center or counts[max(bottom, 0)] >= counts[min(top, HIGH_BINS - 1)]):
                predicted -= counts[max(bottom, 0)] if bottom >= 0 else 0.0
                bottom += 1
            else:
                predicted -= counts[top] if top < HIGH_BINS else 0.0
                top -= 1
        if predicted > budget:
            return False
        self._window = (bottom, top)
        # hardshrink keeps |x| > λ: the bottom λ keeps bins >= bottom (zeros are never kept: nonzero()
        # skips them), the top one keeps the bins above the window (none when it reaches Inf / NaN).
        low_bits, high_bits = bottom << 16, (top + 1) << 16
        self._shrink = (_float_of(low_bits - 1) if low_bits > 0 else 0.0,
                        _float_of(high_bits - 1) if high_bits <= _INF_BITS else math.inf)
        return True

    def observe(self, name: str, start: int, rows: torch.Tensor) -> None:
        """Count the rows ``start:start + len(rows)`` of segment ``name`` (fp32 ``x`` or ``|x|``, 2-D; by ``|x|``)."""
        if self._first:
            self.total += rows.numel()
        if self._pass == _WINDOW and self._window is None and not self._choose_window(rows):
            self._collecting, self._pass = False, _HIGH  # the first block: this pass becomes the first exact one
        if self._pass == _WINDOW:
            if self._collecting:
                self._collect(name, start, rows)
            return
        bits = _bit_rows(rows.abs())
        if self._pass == _HIGH:
            self._high += torch.bincount((bits >> 16).flatten(), minlength=HIGH_BINS).cpu()
            return
        if self._pass == _LOW:
            in_bin = (bits >> 16) == self._bin
            low = bits[in_bin] & _LOW_MASK
            self._low += torch.bincount(low, minlength=LOW_BINS).cpu()
            counts = in_bin.view(torch.uint8).sum(dim=1, dtype=torch.int64)
        else:
            counts = (bits == self._bits).view(torch.uint8).sum(dim=1, dtype=torch.int64)
        per_row = self._row_counts.setdefault(name, torch.zeros(self.rows[name], dtype=torch.int64))
        per_row[start:start + counts.numel()] = counts.cpu()

    def _choose_window(self, rows: torch.Tensor) -> bool:
        """Predict the window from the hint, else from the first block ``rows``."""
        if self._hinted is not None and float(self._hinted.sum()) >= 1:
            return self._predict(self._hinted.round().long(), self._sampled)
        return self._predict(torch.bincount(_bit_rows(rows.abs()).flatten() >> 16, minlength=HIGH_BINS), rows.numel())

    def _collect(self, name: str, start: int, rows: torch.Tensor) -> None:
        """The window pass on one block: count the entries above the window, keep those inside."""
        bottom, top = self._shrink
        if self._scratch is None or self._scratch.numel() < 2 * rows.numel() or self._scratch.device != rows.device:
            self._scratch = torch.empty(2 * rows.numel(), device=rows.device)  # reused: no page faults per block
        above = torch.hardshrink(rows, top, out=self._scratch[:rows.numel()].view(rows.shape))
        inside = torch.hardshrink(rows, bottom, out=self._scratch[rows.numel():2 * rows.numel()].view(rows.shape))
        inside = inside.sub_(above).view(-1)
        if bottom == 0.0:  # the window reaches 0: per-row counts, for a threshold among the zeros
            per_row = above.abs_().sign_().sum(dim=1, dtype=torch.float64)
            counts = self._over_rows.setdefault(name, torch.zeros(self.rows[name], dtype=torch.int64))
            counts[start:start + per_row.numel()] = per_row.cpu().long()
            self._columns[name] = rows.shape[-1]
            over = float(per_row.sum())
        else:
            over = float(above.abs_().sign_().sum(dtype=torch.float64 if above.numel() >= 1 << 24 else None))
        # nonzero on the int32 view: the same positions (the shrinks leave +0, never -0), and its count
        # runs vectorised (on fp32 it is a scalar loop, ~2x slower on CPU).
        flat = torch.nonzero(inside.view(torch.int32)).view(-1)
        if flat.numel() > self._room or not math.isfinite(over):  # the exact passes will follow
            self._collecting = False
            self._drop_kept()
            return
        self._over += over
        self._room -= flat.numel()
        if flat.numel():
            row = torch.div(flat, rows.shape[-1], rounding_mode="floor").add_(start).to(torch.int32)
            self._keep(name, row, _bit_rows(inside[flat].abs_()))

    def _keep(self, name: str, rows: torch.Tensor, bits: torch.Tensor) -> None:
        """Append kept entries (row, bits, segment) to one growing buffer: small tensors kept per block,
        interleaved with each block's temporaries, would fragment the heap (measured: 1.7 GB of it at 70B)."""
        n, used = rows.numel(), self._used
        if self._kept is None or used + n > self._kept.shape[1]:
            grown = torch.empty(3, max(2 * (used + n), 1 << 16), dtype=torch.int32)
            if self._kept is not None:
                grown[:, :used] = self._kept[:, :used]
            self._kept = grown
        self._kept[0, used:used + n] = rows.cpu()
        self._kept[1, used:used + n] = bits.cpu()
        self._kept[2, used:used + n] = self._segments.setdefault(name, len(self._segments))
        self._used = used + n

    def _drop_kept(self) -> None:
        self._kept, self._used, self._segments = None, 0, {}

    def _kept_by_segment(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The kept entries per segment: (rows, bits), in the order kept."""
        kept = self._kept[:, :self._used] if self._kept is not None else torch.zeros(3, 0, dtype=torch.int32)
        per = {}
        for name, segment in self._segments.items():
            if len(self._segments) == 1:  # one tensor (scope: tensor): every kept entry is its own
                per[name] = (kept[0], kept[1])
                continue
            mine = kept[2] == segment
            per[name] = (kept[0][mine], kept[1][mine])
        self._drop_kept()
        return per

    def _finish_window(self) -> bool:
        """End of the window pass: finish from the kept entries when the answer is among them."""
        if not self._collecting or self._window is None:
            return False
        per = self._kept_by_segment()
        top = torch.cat([bits for _, bits in per.values()]) >> 16 if per else torch.zeros(0, dtype=torch.int32)
        kept = top.numel()
        top = top[(top >= self._window[0]) & (top <= self._window[1])]  # a NaN is kept but is no candidate
        need = self.k - int(self._over)
        if need > top.numel() and self._over_rows and kept == top.numel():
            return self._finish_at_zero(need - top.numel(), per)
        if not 1 <= need <= top.numel():
            return False
        self._bin, above = _locate(torch.bincount(top, minlength=HIGH_BINS), need)
        self._above = int(self._over) + above
        in_bin = [bits[(bits >> 16) == self._bin] for _, bits in per.values()]
        self._low = torch.bincount(torch.cat(in_bin) & _LOW_MASK, minlength=LOW_BINS)
        if self._settle():
            return True
        for name, (rows, bits) in per.items():
            self._row_counts[name] = torch.bincount(rows[bits == self._bits].long(), minlength=self.rows[name])
        self._split_ties()
        return True

    def _finish_at_zero(self, need: int, per: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> bool:
        """The window reached 0 and holds fewer than ``need`` more entries: the threshold is 0 and the first
        ``need`` zeros are kept; per row, zeros are what is neither above nor in the window."""
        zeros = {name: self._columns.get(name, 0) - self._over_rows.get(name, torch.zeros(rows, dtype=torch.int64))
                 - (torch.bincount(per[name][0].long(), minlength=rows) if name in per else 0)
                 for name, rows in self.rows.items()}
        if need > sum(int(z.sum()) for z in zeros.values()):
            return False
        self._bits, self._need, self._row_counts = 0, need, zeros
        self._split_ties()
        return True

    def _settle(self) -> bool:
        """From the low histogram of the answer's bin: the threshold; True when every tie is kept."""
        low, above_low = _locate(self._low, self.k - self._above)
        self._bits = (self._bin << 16) | low
        self._need = self.k - self._above - above_low  # 1 <= need <= ties
        if self._need == int(self._low[low]):
            self._finish(Threshold(_float_of(self._bits), KEEP_ALL.tie_row))
            return True
        return False

    def end_pass(self) -> None:
        """Close the current pass; decides whether another one is needed."""
        if self._first:
            self._first = False
            if self.k == 0 or self.k >= self.total:
                self._finish(KEEP_NONE if self.k == 0 else KEEP_ALL)
                return
        self._scratch = None
        if self._pass == _WINDOW:
            if not self._finish_window():
                self._drop_kept()
                self._pass = _HIGH
            return
        if self._pass == _HIGH:
            self._bin, self._above = _locate(self._high, self.k)
            self._pass = _LOW
            return
        if self._pass == _LOW:
            if self._settle():
                return
            if int((self._low != 0).sum()) == 1:
                self._split_ties()  # the bin holds only t: in-bin counts are tie counts
                return
            self._row_counts = {}
            self._pass = _TIES
            return
        self._split_ties()

    def _finish(self, threshold: Threshold) -> None:
        self._thresholds = {name: threshold for name in self.rows}
        self._row_counts = {}

    def _split_ties(self) -> None:
        """Per segment, the rows whose ties are kept: the first ``need`` ties in flat order."""
        value, left = _float_of(self._bits), self._need
        thresholds: dict[str, Threshold] = {}
        for name in self.rows:
            counts = self._row_counts.get(name)
            total = 0 if counts is None else int(counts.sum())
            if left >= total:
                thresholds[name] = Threshold(value, KEEP_ALL.tie_row)
            elif left <= 0:
                thresholds[name] = Threshold(value, -1)
            else:
                assert counts is not None
                cumulative = counts.cumsum(0)
                row = int(torch.searchsorted(cumulative, left))  # first row where the cumulative count reaches left
                before = int(cumulative[row - 1]) if row else 0
                thresholds[name] = Threshold(value, row, left - before)
            left -= total
        self._thresholds = thresholds
        self._row_counts = {}

    def threshold(self, name: str) -> Threshold:
        """What segment ``name`` keeps; only after the last pass."""
        assert self._thresholds is not None, "threshold() before the selection's last pass"
        return self._thresholds[name]


def keep_rows(magnitude: torch.Tensor, start: int, threshold: Threshold) -> torch.Tensor:
    """The keep mask of rows ``start:start + len(magnitude)`` (fp32 ``|x|``, 2-D) under ``threshold``."""
    rows = magnitude.shape[0]
    before = threshold.tie_row - start  # rows of this block whose ties are all kept
    if before >= rows:
        return magnitude >= threshold.value
    mask = magnitude > threshold.value
    if before > 0:
        mask[:before] |= magnitude[:before] == threshold.value
    if 0 <= before < rows and threshold.tie_quota:
        ties = torch.nonzero(magnitude[before] == threshold.value).flatten()[:threshold.tie_quota]
        mask[before, ties] = True
    return mask


def _below(value: float) -> float:
    """The largest fp32 below the positive fp32 ``value``: ``|x| > below(t)`` is ``|x| >= t``."""
    return _float_of(struct.unpack("<i", struct.pack("<f", value))[0] - 1)


def trim_rows(rows: torch.Tensor, start: int, threshold: Threshold) -> torch.Tensor:
    """Rows ``start:start + len(rows)`` (2-D fp32) with the entries ``threshold`` drops set to 0, in place.

    ``hardshrink`` keeps ``|x| > λ`` in one vectorised pass (written over its input: no fresh tensor, whose
    page faults cost more than the pass); a bool mask and a multiply cost about six times as much on CPU.
    """
    value = threshold.value
    if value < 0:
        return rows
    if value == float("inf"):
        return rows.zero_()
    with_ties = _below(value) if value > 0 else -1.0
    before = threshold.tie_row - start  # rows of this block whose ties are all kept
    if before >= rows.shape[0]:
        return rows if with_ties < 0 else torch.hardshrink(rows, with_ties, out=rows)
    tie_row = rows[before].clone() if 0 <= before and threshold.tie_quota else None
    if before > 0 and with_ties >= 0:
        torch.hardshrink(rows[:before], with_ties, out=rows[:before])
    tail = rows[max(before, 0):]
    torch.hardshrink(tail, value, out=tail)
    if tie_row is not None:
        ties = torch.nonzero(tie_row.abs() == value).flatten()[:threshold.tie_quota]
        rows[before, ties] = tie_row[ties]
    return rows
