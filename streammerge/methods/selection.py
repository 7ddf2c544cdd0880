"""Exact top-``k`` by ``|value|`` over row blocks: a two-level radix select on fp32 bit patterns.

Non-negative fp32 values order like their int32 bit patterns.  Pass 1 counts the top 16 bits
of every ``|δ|`` (32768 bins), which finds the bin holding the k-th largest; pass 2 counts the
low 16 bits of the entries in that bin, which gives the exact threshold ``t``.  The counts are
integers, so they add up over blocks (and over tensors, for ``scope: global``) in any order
and the answer does not depend on the blocking.

Usually one pass suffices: pass 1 also keeps the few entries in the bins where the first block
predicts the answer, and finishes from them when the prediction holds (``TopKSelect``).

Exactly ``k`` entries are kept: every ``|δ| > t`` and the first ties ``|δ| == t`` in flat index
order (row-major over a tensor, then over the segments in the order given).  Which ties those
are is a :class:`Threshold` per segment: ties in rows before ``tie_row`` are kept, in row
``tie_row`` the first ``tie_quota``, after it none.  The per-row tie counts come from pass 2
when the threshold's bin holds a single value (the usual case for task vectors between bf16
models), otherwise from a third pass; none is needed when every tie is kept.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass

import torch

__all__ = ["HIGH_BINS", "LOW_BINS", "Threshold", "KEEP_ALL", "KEEP_NONE", "TopKSelect", "keep_rows", "trim_rows"]

HIGH_BINS = 1 << 15
"""Bins of pass 1: bit patterns of non-negative fp32 values have 15 significant top bits."""
LOW_BINS = 1 << 16
"""Bins of pass 2: the low 16 bits."""
_LOW_MASK = LOW_BINS - 1


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
"""Pass 1 also keeps the entries whose top-16-bit bin lies within this share of ranks (or 4σ)
around the answer's rank as the first block predicts it, plus one bin either side."""
CANDIDATE_LIMIT = 1 << 22
"""At most this many kept entries (8 bytes each) per selection; beyond it the window is dropped."""


class TopKSelect:
    """Exact selection of the ``k`` largest ``|x|`` over the row blocks of ordered segments.

    Feed every row block of every segment once per pass (``observe``), in any order, then call
    ``end_pass``; repeat while ``needs_pass()``.  ``threshold(name)`` then says what to keep.

    Pass 1 also keeps the entries (bits and row) in the bins where a first look (the first block
    observed, or ``hint``) expects the answer (``WINDOW_MARGIN``): when the answer's bin is
    among them, the selection finishes after one pass; otherwise the exact passes follow.  The
    result is the same either way; only the number of passes depends on the data and order.

    Args:
        k: how many entries to keep over all segments (``0 <= k <= Σ numel``).
        segments: segment name → number of rows, in tie-breaking order; the columns per row
            are the last axis of the rows observed.
        size: total entries over all segments (for the first look).
        candidate_limit: most entries kept for the one-pass finish.
    """

    def __init__(self, k: int, segments: Mapping[str, int], size: int,
                 candidate_limit: int = CANDIDATE_LIMIT) -> None:
        self.k = k
        self.rows = dict(segments)
        self.size = size
        self.total = 0
        self._pass = 0
        self._high = torch.zeros(HIGH_BINS, dtype=torch.int64)
        self._low = torch.zeros(LOW_BINS, dtype=torch.int64)
        self._bin = 0
        self._above = 0
        self._bits = 0
        self._need = 0
        self._row_counts: dict[str, torch.Tensor] = {}
        self._thresholds: dict[str, Threshold] | None = None
        self._window: tuple[int, int] | None = None
        self._hinted: torch.Tensor | None = None
        self._sampled = 0
        self._collecting = 0 < k < size
        self._room = candidate_limit
        self._candidates: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}

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

    def _predict(self, high: torch.Tensor, n: int) -> None:
        q, total = self.k / self.size, max(1, int(high.sum()))
        margin = max(WINDOW_MARGIN, 4 * math.sqrt(q * (1 - q) / n))  # ≥ 4 sampling σ of the sample's quantile
        top = _locate(high, max(1, min(total, round((q - margin) * total))))[0]
        bottom = _locate(high, max(1, min(total, round((q + margin) * total))))[0]
        self._window = (bottom - 1, top + 1)

    def observe(self, name: str, start: int, magnitude: torch.Tensor) -> None:
        """Count the rows ``start:start + len(magnitude)`` of segment ``name`` (fp32 ``|x|``, 2-D)."""
        bits = _bit_rows(magnitude)
        if self._pass == 0:
            self.total += bits.numel()
            top = bits >> 16
            high = torch.bincount(top.flatten(), minlength=HIGH_BINS).cpu()
            self._high += high
            if self._window is None and self._collecting:
                if self._hinted is not None and float(self._hinted.sum()) >= 1:
                    self._predict(self._hinted.round().long(), self._sampled)
                else:
                    self._predict(high, bits.numel())
            if self._collecting:
                self._collect(name, start, bits, top)
            return
        if self._pass == 1:
            in_bin = (bits >> 16) == self._bin
            low = bits[in_bin] & _LOW_MASK
            self._low += torch.bincount(low, minlength=LOW_BINS).cpu()
            counts = in_bin.view(torch.uint8).sum(dim=1, dtype=torch.int64)
        else:
            counts = (bits == self._bits).view(torch.uint8).sum(dim=1, dtype=torch.int64)
        rows = self._row_counts.setdefault(name, torch.zeros(self.rows[name], dtype=torch.int64))
        rows[start:start + counts.numel()] = counts.cpu()

    def _collect(self, name: str, start: int, bits: torch.Tensor, top: torch.Tensor) -> None:
        assert self._window is not None
        low, high = self._window
        flat = torch.nonzero(((top >= low) & (top <= high)).flatten()).flatten()
        if flat.numel() > self._room:  # too many to keep: the exact passes will follow
            self._collecting, self._candidates = False, {}
            return
        self._room -= flat.numel()
        if flat.numel():
            rows = (flat // bits.shape[-1] + start).to(torch.int32).cpu()
            self._candidates.setdefault(name, []).append((rows, bits.flatten()[flat].cpu()))

    def _finish_from_candidates(self) -> bool:
        """Finish pass 1 from the kept entries when the answer's bin is among them."""
        if not self._collecting or self._window is None or not self._window[0] <= self._bin <= self._window[1]:
            self._candidates = {}
            return False
        per = {name: (torch.cat([r for r, _ in parts]), torch.cat([b for _, b in parts]))
               for name, parts in self._candidates.items()}
        self._candidates = {}
        in_bin = [bits[(bits >> 16) == self._bin] for _, bits in per.values()]
        low = torch.cat(in_bin) & _LOW_MASK if in_bin else torch.zeros(0, dtype=torch.int32)
        self._low = torch.bincount(low, minlength=LOW_BINS)
        if self._settle():
            return True
        for name, (rows, bits) in per.items():
            self._row_counts[name] = torch.bincount(rows[bits == self._bits].long(), minlength=self.rows[name])
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
        if self._pass == 0:
            if self.k == 0 or self.k >= self.total:
                self._finish(KEEP_NONE if self.k == 0 else KEEP_ALL)
                return
            self._bin, self._above = _locate(self._high, self.k)
            if not self._finish_from_candidates():
                self._pass = 1
            return
        if self._pass == 1:
            if self._settle():
                return
            if int((self._low != 0).sum()) == 1:
                self._split_ties()  # the bin holds only t: in-bin counts are tie counts
                return
            self._row_counts = {}
            self._pass = 2
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
    """Rows ``start:start + len(rows)`` (2-D fp32) with the entries ``threshold`` drops set to 0 (a new tensor).

    ``hardshrink`` keeps ``|x| > λ`` in one vectorised pass; a bool mask and a multiply cost
    about six times as much on CPU.
    """
    value = threshold.value
    if value < 0:
        return rows.clone()
    if value == float("inf"):
        return torch.zeros_like(rows)
    with_ties = _below(value) if value > 0 else -1.0
    before = threshold.tie_row - start  # rows of this block whose ties are all kept
    if before >= rows.shape[0]:
        return rows.clone() if with_ties < 0 else torch.nn.functional.hardshrink(rows, with_ties)
    out = torch.nn.functional.hardshrink(rows, value)
    if before > 0:
        out[:before] = rows[:before] if with_ties < 0 else torch.nn.functional.hardshrink(rows[:before], with_ties)
    if 0 <= before and threshold.tie_quota:
        row = rows[before]
        ties = torch.nonzero(row.abs() == value).flatten()[:threshold.tie_quota]
        out[before, ties] = row[ties]
    return out
