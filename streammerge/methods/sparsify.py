"""Sparsifiers for dense task deltas: magnitude trim (TIES), random drop (DARE), band (Breadcrumbs).

A sparsifier is called as ``sparsify(delta, index)`` on a fresh tensor that it may overwrite
(saving a dense copy per input) and returns the result; ``index`` names
the input so that a two-pass consumer (TIES sign election, then disjoint mean) gets the same
answer twice: magnitude thresholds are cached per input, DARE masks are regenerated from a
per-input seed drawn once from the tensor's generator (ALGORITHMS.md rule 6).

Kept counts: the magnitude trim keeps exactly ``int(fraction · n)`` entries, like PEFT's
``magnitude_based_pruning`` and mergekit; entries tied with the threshold are kept in flat
index order (row-major), which is ``torch.sort(stable=True)``'s order.  PEFT and mergekit pick
among ties with ``torch.topk`` / an unstable ``argsort``, whose choice is unspecified, so on
tied magnitudes they keep the same count and the same values but may keep other positions.
Breadcrumbs' band keeps every entry tied with its bounds.

DARE's keep mask of input ``i`` is drawn per fixed chunk of ``MASK_CHUNK`` entries of the
flattened tensor, each chunk from its own seed derived from (input seed, chunk index), so any
row block of the tensor sees the same mask whatever the blocking (``RandomDrop.mask_range``).
Each chunk is NumPy's PCG64 seeded so; entry ``j`` of the chunk is kept when the ``j``-th 32-bit
half of its raw 64-bit draws (little-endian), read as a signed int32 ``v``, is below
``round(density · 2^32) − 2^31``: probability ``round(density · 2^32) / 2^32``.  Drawn on the host
whatever the device, so CPU and CUDA keep the same entries.  (Until 2026-12 the mask was
``torch.rand(chunk) < density`` from a torch generator per chunk: twice the CPU time.)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .base import at_input
from .row_ranks import keep_between_, largest_per_row, scratch_entries
from .selection import KEEP_ALL, KEEP_NONE, Threshold, trim_rows

__all__ = ["Sparsifier", "SPARSIFIERS", "MASK_CHUNK", "keep_count", "kth_largest", "as_rows", "top_k_threshold",
           "chunk_seed", "MagnitudeTrim", "RandomDrop", "Band", "L1Rescale", "identity", "build_sparsifier"]

Sparsifier = Callable[[torch.Tensor, int], torch.Tensor]


def keep_count(fraction: float, n: int, at_least: int = 0) -> int:
    """How many of ``n`` entries a ``fraction`` keeps: the floor (like PEFT), raised to ``at_least``
    when ``fraction > 0`` (mergekit's magnitude trim keeps ``max(1, int(density·n))``)."""
    k = int(fraction * n)
    if fraction > 0:
        k = max(k, at_least)
    return min(n, k)


SELECT_SAMPLE = 1 << 16
"""Above this many entries ``kth_largest`` brackets the answer from a sample first."""
SELECT_MARGIN = 0.004
"""Half-width of the quantile bracket around the sample's estimate (≥ 7 sampling σ at p = ½)."""


def kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The exact ``k``-th largest entry of the 1-D ``values`` (1 ≤ k ≤ numel), as a 0-d tensor.

    ``kthvalue`` over a 4096×14336 delta takes ~3 s on a CPU core.  For large inputs we estimate
    the answer's quantile from a fixed-seed sample, count the entries above the bracket, and
    select inside the bracket only (a few percent of the entries); when the answer is not inside
    (an unlucky sample), the full ``kthvalue`` runs.  The result is the same either way.
    """
    n = values.numel()
    if n <= SELECT_SAMPLE:
        return values.kthvalue(n - k + 1).values
    generator = torch.Generator(device=values.device).manual_seed(0)
    sample = values[torch.randint(0, n, (SELECT_SAMPLE,), generator=generator, device=values.device)]
    q = 1 - k / n  # the answer's quantile
    bounds = torch.tensor([max(q - SELECT_MARGIN, 0.0), min(q + SELECT_MARGIN, 1.0)], device=values.device)
    low, high = torch.quantile(sample, bounds.to(sample.dtype)).tolist()
    above = int((values > high).sum())
    inside = values[(values >= low) & (values <= high)]
    need = k - above  # the answer is the need-th largest inside the bracket
    if 1 <= need <= inside.numel():
        return inside.kthvalue(inside.numel() - need + 1).values
    return values.kthvalue(n - k + 1).values


def as_rows(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` as 2-D rows along its last axis (a 1-D tensor is one row, a scalar one entry)."""
    return tensor.reshape(-1, tensor.shape[-1]) if tensor.dim() else tensor.reshape(1, 1)


def top_k_threshold(magnitude: torch.Tensor, k: int) -> Threshold:
    """What keeps exactly the ``k`` largest of the 2-D ``magnitude`` rows, ties in flat index order."""
    n = magnitude.numel()
    if k == 0:
        return KEEP_NONE
    if k == n:
        return KEEP_ALL
    flat = magnitude.flatten()
    value = kth_largest(flat, k)
    if int((flat >= value).sum()) == k:  # no surplus ties: the common case for continuous values
        return Threshold(float(value), KEEP_ALL.tie_row)
    need = k - int((flat > value).sum())
    kept = torch.nonzero(flat == value).flatten()[:need]
    row = int(kept[-1]) // magnitude.shape[-1]
    return Threshold(float(value), row, int((kept >= row * magnitude.shape[-1]).sum()))


def identity(delta: torch.Tensor, index: int) -> torch.Tensor:
    """No sparsification."""
    return delta


class MagnitudeTrim:
    """Keep the top ``density`` fraction of each delta by ``|value|``, per tensor (TIES trim).

    Exactly ``keep_count(density, n)`` entries survive (ties in flat index order).  With
    ``thresholds`` (one per input, from a whole-model selection: ``scope: global``) those
    apply instead of the tensor's own.  ``density`` may be a tuple, one per input.
    """

    def __init__(self, density: float | tuple[float, ...], thresholds: Sequence[Threshold] | None = None,
                 at_least: int = 0) -> None:
        self.density = density
        self.at_least = at_least
        self._thresholds: dict[int, Threshold] = dict(enumerate(thresholds)) if thresholds is not None else {}

    def threshold(self, delta: torch.Tensor, index: int = 0) -> Threshold:
        """What this trim keeps of input ``index``'s ``delta`` (any shape; rows along the last axis)."""
        k = keep_count(at_input(self.density, index), delta.numel(), self.at_least)
        return top_k_threshold(as_rows(delta.abs()), k)

    def __call__(self, delta: torch.Tensor, index: int) -> torch.Tensor:
        if index not in self._thresholds:
            self._thresholds[index] = self.threshold(delta, index)
        return trim_rows(as_rows(delta), 0, self._thresholds[index]).view(delta.shape)


MASK_CHUNK = 1 << 16
"""Entries of the flattened tensor per DARE mask chunk (one generator seed each)."""
_GOLDEN = 0x9E3779B97F4A7C15
_MASK64 = (1 << 64) - 1


def chunk_seed(seed: int, chunk: int) -> int:
    """The generator seed of mask chunk ``chunk`` of an input seeded ``seed`` (splitmix64, 63 bits)."""
    z = (seed + (chunk + 1) * _GOLDEN) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


def _keep_below(density: float) -> np.int32:
    """DARE keeps an entry when its signed 32-bit draw ``v < below``: probability ``round(density · 2^32) / 2^32``."""
    return np.int32(min(max(round(density * 2**32) - 2**31, -2**31), 2**31 - 1))


class RandomDrop:
    """DARE: keep each entry with probability ``density`` and rescale kept ones by ``1/density``.

    One seed per input is drawn from ``generator`` up front; the mask of input ``i`` is a pure
    function of that seed and the entry's flat index (chunks of ``MASK_CHUNK``), so both TIES
    passes, a re-run and every row blocking see the same mask.  ``density`` may be a tuple, one per input.
    """

    def __init__(self, density: float | tuple[float, ...], generator: torch.Generator, count: int,
                 rescale: str = "density") -> None:
        self.density = density
        self.rescale = rescale
        self.device = generator.device
        self.seeds = torch.randint(0, 2**62, (count,), generator=generator, device=self.device).tolist()
        self._last: dict[int, tuple[int, torch.Tensor]] = {}  # input -> (chunk, its mask): block edges reuse it
        self._joined: dict[int, torch.Tensor] = {}  # input -> mask_range(reuse=True)'s buffer (inputs run on threads)

    def _fill(self, index: int, chunk: int, out: torch.Tensor) -> torch.Tensor:
        """Chunk ``chunk``'s mask of input ``index`` written into ``out`` (``MASK_CHUNK`` fp32 ones and zeros).

        One 64-bit PCG64 draw gives two entries; NumPy compares the int32 halves, and the bytes of that
        bool array become fp32 in one conversion (from ``uint8``: a ``bool`` source takes a slow path).
        """
        density = at_input(self.density, index)
        if density >= 1.0:
            return out.fill_(1.0)
        draws = np.random.PCG64(chunk_seed(self.seeds[index], chunk)).random_raw(MASK_CHUNK // 2)
        keep = np.less(draws.view(np.dtype("<i4")), _keep_below(density)).view(np.uint8)
        return out.copy_(torch.from_numpy(keep))

    def _chunk(self, index: int, chunk: int) -> torch.Tensor:
        last = self._last.get(index)
        if last is not None and last[0] == chunk:
            return last[1]
        mask = self._fill(index, chunk, torch.empty(MASK_CHUNK, device=self.device))
        self._last[index] = (chunk, mask)
        return mask

    def mask_range(self, index: int, start: int, stop: int, reuse: bool = False) -> torch.Tensor:
        """The keep mask of flat entries ``start:stop`` of input ``index`` (1-D fp32 ones and zeros:
        multiplying by it is ~3x faster than by a bool mask on CPU).  ``reuse``: in a buffer this drop
        keeps for input ``index``, valid until its next ``reuse`` call for it (no fresh tensor per row block)."""
        first, last = start // MASK_CHUNK, (stop - 1) // MASK_CHUNK
        if first == last:
            return self._chunk(index, first)[start - first * MASK_CHUNK:stop - first * MASK_CHUNK]
        offset = first * MASK_CHUNK
        size = (last + 1 - first) * MASK_CHUNK
        if reuse:
            held = self._joined.get(index)
            if held is None or held.numel() < size:
                held = self._joined[index] = torch.empty(size, device=self.device)
            joined = held[:size]
        else:
            joined = torch.empty(size, device=self.device)
        cached = self._last.get(index)
        for c in range(first, last + 1):  # drawn in place; a chunk the last range ended inside is reused
            part = joined[(c - first) * MASK_CHUNK:(c + 1 - first) * MASK_CHUNK]
            if cached is not None and cached[0] == c:
                part.copy_(cached[1])
            else:
                self._fill(index, c, part)
        if stop % MASK_CHUNK:
            self._last[index] = (last, joined[(last - first) * MASK_CHUNK:].clone())
        return joined[start - offset:stop - offset]

    def mask(self, shape: torch.Size, index: int) -> torch.Tensor:
        """The keep mask of input ``index`` over a whole tensor of ``shape``."""
        if shape.numel() == 0:
            return torch.ones(shape, device=self.device)
        return self.mask_range(index, 0, shape.numel()).view(shape)

    def __call__(self, delta: torch.Tensor, index: int) -> torch.Tensor:
        delta = delta.mul_(self.mask(delta.shape, index))
        return delta.div_(at_input(self.density, index)) if self.rescale == "density" else delta


class Band:
    """Breadcrumbs: drop the largest ``gamma`` fraction by ``|value|`` and keep the next ``density``
    fraction, per output row (``scope="row"``, slices along the last axis; 1-D tensors are one row)
    or over the whole flattened tensor (``scope="tensor"``, mergekit's ``magnitude_outliers``: there
    ``density >= 1`` keeps everything and the outlier drop shrinks to fit ``n - keep``).  ``density`` and
    ``gamma`` may be tuples, one per input."""

    def __init__(self, density: float | tuple[float, ...], gamma: float | tuple[float, ...],
                 scope: str = "row") -> None:
        self.density = density
        self.gamma = gamma
        self.scope = scope
        self._bounds: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._scratch: dict[int, torch.Tensor] = {}  # per input: largest_per_row's, reused (no page faults per call)

    def _rows(self, delta: torch.Tensor) -> torch.Tensor:
        if self.scope == "tensor" or not delta.dim():
            return delta.reshape(1, -1)
        return delta.reshape(-1, delta.shape[-1])

    def bounds(self, delta: torch.Tensor, index: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row ``(low, high)``, each ``[rows, 1]``: input ``index``'s kept entries have ``low <= |v| <= high``."""
        rows = self._rows(delta)
        n = rows.shape[-1]
        density = at_input(self.density, index)
        drop, keep = keep_count(at_input(self.gamma, index), n), keep_count(density, n)
        if self.scope == "tensor":
            if density >= 1:
                inf = torch.full((1, 1), float("inf"), device=delta.device)
                return -inf, inf
            drop = min(drop, n - keep)
        if keep == 0:
            inf = torch.full((rows.shape[0], 1), float("inf"), device=delta.device)
            return inf, -inf
        if self.scope == "tensor":  # one exact selection over the flattened tensor, no sort
            flat = rows.abs().flatten()
            high = kth_largest(flat, drop + 1) if drop else flat.max()
            return kth_largest(flat, drop + keep).reshape(1, 1), high.reshape(1, 1)
        low, high = largest_per_row(rows, (drop + keep, drop + 1), self._scratch_of(rows, index))
        return low, high

    def _scratch_of(self, rows: torch.Tensor, index: int) -> torch.Tensor:
        held = self._scratch.get(index)
        if held is None or held.numel() < scratch_entries(tuple(rows.shape)) or held.device != rows.device:
            held = self._scratch[index] = torch.empty(scratch_entries(tuple(rows.shape)), dtype=torch.int32,
                                                      device=rows.device)
        return held

    def keep(self, rows: torch.Tensor, low: torch.Tensor, high: torch.Tensor, index: int = 0) -> torch.Tensor:
        """``rows`` (2-D, ``_rows``' shape) with the entries outside input ``index``'s band set to 0, in place."""
        if self.scope == "tensor":  # one row of the whole tensor: no scratch of its size
            magnitude = rows.abs()
            return rows.mul_((magnitude >= low) & (magnitude <= high))
        return keep_between_(rows, low, high, self._scratch_of(rows, index))

    def __call__(self, delta: torch.Tensor, index: int) -> torch.Tensor:
        if index not in self._bounds:
            self._bounds[index] = self.bounds(delta, index)
        low, high = self._bounds[index]
        delta = delta.contiguous()  # a transposed (Conv1D) task vector arrives strided
        self.keep(self._rows(delta), low, high, index)
        return delta


class L1Rescale:
    """mergekit's ``rescale``: after ``inner``, multiply input ``i``'s kept entries by
    ``‖δ_i‖₁ / ‖sparsified δ_i‖₁`` (unchanged when either norm is below ``eps``), so each
    sparsified delta keeps its L1 norm.  A whole-tensor statistic: no row-block form."""

    def __init__(self, inner: Sparsifier, eps: float = 1e-7) -> None:
        self.inner = inner
        self.eps = eps

    def __call__(self, delta: torch.Tensor, index: int) -> torch.Tensor:
        before = delta.abs().sum()
        kept = self.inner(delta, index)
        after = kept.abs().sum()
        if before < self.eps or after < self.eps:
            return kept
        return kept.mul_(before / after)


def _magnitude(params: Mapping[str, Any], generator: torch.Generator, count: int) -> Sparsifier:
    return MagnitudeTrim(params["density"], at_least=params.get("min_keep", 0))


def _random(params: Mapping[str, Any], generator: torch.Generator, count: int) -> Sparsifier:
    return RandomDrop(params["density"], generator, count, params.get("rescale", "density"))


def _band(params: Mapping[str, Any], generator: torch.Generator, count: int) -> Sparsifier:
    return Band(params["density"], params["gamma"], params.get("band", "row"))


def _none(params: Mapping[str, Any], generator: torch.Generator, count: int) -> Sparsifier:
    return identity


SPARSIFIERS: dict[str, Callable[[Mapping[str, Any], torch.Generator, int], Sparsifier]] = {
    "none": _none,
    "magnitude": _magnitude,
    "random": _random,
    "band": _band,
}


def build_sparsifier(kind: str, params: Mapping[str, Any], generator: torch.Generator, count: int) -> Sparsifier:
    """The sparsifier ``kind`` (a key of ``SPARSIFIERS``) configured from a method's parameters
    (``rescale: l1`` wraps it in ``L1Rescale``)."""
    sparsify = SPARSIFIERS[kind](params, generator, count)
    return L1Rescale(sparsify) if params.get("rescale") == "l1" else sparsify
