"""Sparsifiers for dense task deltas: magnitude trim (TIES), random drop (DARE), band (Breadcrumbs).

A sparsifier is called as ``sparsify(delta, index)`` on a fresh tensor that it may overwrite
(saving a dense copy per input) and returns the result; ``index`` names
the input so that a two-pass consumer (TIES sign election, then disjoint mean) gets the same
answer twice: magnitude thresholds are cached per input, DARE masks are regenerated from a
per-input seed drawn once from the tensor's generator (ALGORITHMS.md rule 6).
Kept counts follow mergekit/PEFT: ``int(fraction · n)``; entries tied with a threshold are kept.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

__all__ = ["Sparsifier", "SPARSIFIERS", "keep_count", "kth_largest", "MagnitudeTrim", "RandomDrop", "Band",
           "identity", "build_sparsifier"]

Sparsifier = Callable[[torch.Tensor, int], torch.Tensor]


def keep_count(fraction: float, n: int) -> int:
    """How many of ``n`` entries a ``fraction`` keeps (floor, like mergekit and PEFT)."""
    return min(n, int(fraction * n))


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


def identity(delta: torch.Tensor, index: int) -> torch.Tensor:
    """No sparsification."""
    return delta


class MagnitudeTrim:
    """Keep the top ``density`` fraction of each delta by ``|value|``, per tensor (TIES trim)."""

    def __init__(self, density: float) -> None:
        self.density = density
        self._thresholds: dict[int, torch.Tensor] = {}

    def threshold(self, delta: torch.Tensor) -> torch.Tensor:
        """The smallest kept ``|value|`` (``inf`` keeps nothing, 0 keeps everything)."""
        n = delta.numel()
        k = keep_count(self.density, n)
        if k == 0:
            return torch.tensor(float("inf"), device=delta.device)
        if k == n:
            return torch.tensor(0.0, device=delta.device)
        return kth_largest(delta.abs().flatten(), k)

    def __call__(self, delta: torch.Tensor, index: int) -> torch.Tensor:
        if index not in self._thresholds:
            self._thresholds[index] = self.threshold(delta)
        return delta.mul_(delta.abs() >= self._thresholds[index])


class RandomDrop:
    """DARE: keep each entry with probability ``density`` and rescale kept ones by ``1/density``.

    One seed per input is drawn from ``generator`` up front; the mask of input ``i`` is a pure
    function of that seed, so both TIES passes (and a re-run) see the same mask.
    """

    def __init__(self, density: float, generator: torch.Generator, count: int) -> None:
        self.density = density
        self.device = generator.device
        self.seeds = torch.randint(0, 2**62, (count,), generator=generator, device=self.device).tolist()

    def mask(self, shape: torch.Size, index: int) -> torch.Tensor:
        """The keep mask of input ``index``."""
        generator = torch.Generator(device=self.device)
        generator.manual_seed(self.seeds[index])
        return torch.rand(shape, generator=generator, device=self.device) < self.density

    def __call__(self, delta: torch.Tensor, index: int) -> torch.Tensor:
        return delta.mul_(self.mask(delta.shape, index)).div_(self.density)


class Band:
    """Breadcrumbs: per output row (slice along the last axis) drop the largest ``gamma`` fraction
    by ``|value|`` and keep the next ``density`` fraction; 1-D tensors are one row."""

    def __init__(self, density: float, gamma: float) -> None:
        self.density = density
        self.gamma = gamma
        self._bounds: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def bounds(self, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row ``(low, high)``: kept entries have ``low <= |value| <= high``."""
        rows = delta.abs().reshape(-1, delta.shape[-1]) if delta.dim() else delta.abs().reshape(1, 1)
        n = rows.shape[-1]
        drop, keep = keep_count(self.gamma, n), keep_count(self.density, n)
        if keep == 0:
            inf = torch.full((rows.shape[0], 1), float("inf"), device=delta.device)
            return inf, -inf
        high = rows.kthvalue(n - drop, dim=-1, keepdim=True).values
        low = rows.kthvalue(n - drop - keep + 1, dim=-1, keepdim=True).values
        return low, high

    def __call__(self, delta: torch.Tensor, index: int) -> torch.Tensor:
        if index not in self._bounds:
            self._bounds[index] = self.bounds(delta)
        low, high = self._bounds[index]
        delta = delta.contiguous()  # a transposed (Conv1D) task vector arrives strided
        rows = delta.view(-1, delta.shape[-1]) if delta.dim() else delta.view(1, 1)
        magnitude = rows.abs()
        rows.mul_((magnitude >= low) & (magnitude <= high))
        return delta


def _magnitude(params: Mapping[str, Any], generator: torch.Generator, count: int) -> Sparsifier:
    return MagnitudeTrim(params["density"])


def _random(params: Mapping[str, Any], generator: torch.Generator, count: int) -> Sparsifier:
    return RandomDrop(params["density"], generator, count)


def _band(params: Mapping[str, Any], generator: torch.Generator, count: int) -> Sparsifier:
    return Band(params["density"], params["gamma"])


def _none(params: Mapping[str, Any], generator: torch.Generator, count: int) -> Sparsifier:
    return identity


SPARSIFIERS: dict[str, Callable[[Mapping[str, Any], torch.Generator, int], Sparsifier]] = {
    "none": _none,
    "magnitude": _magnitude,
    "random": _random,
    "band": _band,
}


def build_sparsifier(kind: str, params: Mapping[str, Any], generator: torch.Generator, count: int) -> Sparsifier:
    """The sparsifier ``kind`` (a key of ``SPARSIFIERS``) configured from a method's parameters."""
    return SPARSIFIERS[kind](params, generator, count)
