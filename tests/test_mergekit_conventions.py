"""``conventions: mergekit`` against references written here from mergekit 0.1.5's documented
formulas (``generalized_task_arithmetic.py``, ``sparsify.py``), not from mergekit itself.

mergekit, per tensor: ``δ_i = sparsify(M_i − W0)``; ``δ_i *= w_i``; with a consensus,
``γ = +1 where Σ_i δ_i >= 0 else −1``, ``mask_i = sign(δ_i) == γ``, ``mixed = Σ δ_i·mask_i``,
``divisor = Σ w_i·mask_i`` (0 → 1); without, ``mixed = Σ δ_i``, ``divisor = Σ w_i`` (|·| < 1e-8 → 1);
``normalize`` divides by the divisor; ``λ ≠ 1`` multiplies; ``W = W0 + mixed``.
"""

from __future__ import annotations

import pytest
import torch

from streammerge.conventions import convention_defaults
from streammerge.methods import DenseUpdate, MergeInputs, get_method
from streammerge.methods.rows import merge_by_blocks
from streammerge.methods.sparsify import RandomDrop

pytestmark = pytest.mark.usefixtures("one_torch_thread", "small_grid")

SHAPE = (48, 40)


@pytest.fixture
def small_grid(monkeypatch: pytest.MonkeyPatch) -> None:
    """An 8-row grid step for SHAPE, so the row-block form runs 6 blocks."""
    from streammerge.methods import common

    monkeypatch.setattr(common, "GRID_ELEMENTS", 8 * SHAPE[1])


def deltas(count: int = 3, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(SHAPE, generator=g) for _ in range(count)]


def ours(method: str, ds: list[torch.Tensor], weights: list[float], given: dict, seed: int = 5) -> torch.Tensor:
    m = get_method(method)
    params = m.resolve_params({**convention_defaults(method, "mergekit"), **given})
    inputs = MergeInputs("model.layers.0.mlp.up_proj.weight", torch.zeros(SHAPE), tuple(DenseUpdate(d) for d in ds),
                         tuple(weights), torch.Generator().manual_seed(seed))
    return m.merge(inputs, params).update.dense()


def blocks(method: str, ds: list[torch.Tensor], weights: list[float], given: dict, seed: int = 5) -> torch.Tensor:
    m = get_method(method)
    params = m.resolve_params({**convention_defaults(method, "mergekit"), **given})
    assert m.rows is not None and m.rows.supports(params)
    inputs = MergeInputs("w", torch.zeros(SHAPE), tuple(DenseUpdate(d) for d in ds), tuple(weights),
                         torch.Generator().manual_seed(seed))
    return merge_by_blocks(m.rows, inputs, params, 8).view(SHAPE)


# --- mergekit's formulas ------------------------------------------------------------------

def mk_magnitude(t: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the top max(1, int(density·n)) by |value| (density >= 1: all; <= 0: none)."""
    if density >= 1:
        return t
    if density <= 0:
        return torch.zeros_like(t)
    k = max(1, int(density * t.numel()))
    mask = torch.zeros(t.numel())
    mask[torch.argsort(t.abs().flatten(), descending=True)[:k]] = 1
    return t * mask.view(t.shape)


def mk_outliers(t: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Drop the top int(gamma·n) (fewer if needed), keep the next int(density·n): one band over the tensor."""
    if density >= 1:
        return t
    n = t.numel()
    target, top = int(density * n), int(gamma * n)
    bottom = max(0, n - target - top)
    mask = torch.zeros(n)
    mask[torch.sort(t.abs().flatten()).indices[bottom:bottom + target]] = 1
    return t * mask.view(t.shape)


def mk_l1(t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    masked = t * mask
    before, after = t.abs().sum(), masked.abs().sum()
    return masked if before < 1e-7 or after < 1e-7 else masked * (before / after)


def mk_combine(sparse: list[torch.Tensor], weights: list[float], consensus: bool, normalize: bool,
               lam: float = 1.0) -> torch.Tensor:
    stacked = torch.stack(sparse)
    w = torch.tensor(weights, dtype=torch.float32).view(-1, *[1] * sparse[0].dim())
    stacked = stacked * w
    if consensus:
        majority = (stacked.sum(dim=0) >= 0).float() * 2 - 1
        mask = stacked.sign() == majority
        mixed = (stacked * mask).sum(dim=0)
        divisor = (w * mask).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = stacked.sum(dim=0)
        divisor = w.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed = mixed / divisor
    return mixed * lam if lam != 1 else mixed


# --- the conventions ----------------------------------------------------------------------

@pytest.mark.parametrize("density", [0.3, 0.0001, 1.0])
def test_ties_divides_by_the_agreeing_weights_and_keeps_at_least_one(density: float) -> None:
    ds, weights = deltas(), [0.7, 0.2, 0.5]
    reference = mk_combine([mk_magnitude(d, density) for d in ds], weights, consensus=True, normalize=True)
    result = ours("ties", ds, weights, {"density": density})
    assert torch.equal(result, reference)
    assert torch.equal(blocks("ties", ds, weights, {"density": density}), reference)
    if density == 0.0001:  # int(0.0001 · 1920) = 0, mergekit keeps 1 per input
        assert 1 <= int((result != 0).sum()) <= 3


def test_ties_without_normalize_is_the_agreeing_sum_and_lambda_scales_after() -> None:
    ds, weights = deltas(seed=1), [1.0, 0.6, 0.3]
    reference = mk_combine([mk_magnitude(d, 0.5) for d in ds], weights, True, normalize=False, lam=0.8)
    assert torch.equal(ours("ties", ds, weights, {"density": 0.5, "normalize": "none", "lambda": 0.8}), reference)


def test_ties_count_normalization_stays_the_default_without_the_convention() -> None:
    ds = deltas(seed=2)
    m = get_method("ties")
    params = m.resolve_params({"density": 0.5})
    assert params["normalize"] == "count" and params["min_keep"] == 0
    inputs = MergeInputs("w", torch.zeros(SHAPE), tuple(DenseUpdate(d) for d in ds), (0.5, 1.0, 2.0),
                         torch.Generator().manual_seed(0))
    by_count = m.merge(inputs, params).update.dense()
    by_weight = m.merge(inputs, {**params, "normalize": "weights"}).update.dense()
    assert not torch.equal(by_count, by_weight)


@pytest.mark.parametrize("method,consensus", [("breadcrumbs", False), ("breadcrumbs_ties", True)])
@pytest.mark.parametrize("density,gamma", [(0.4, 0.05), (0.9, 0.3), (1.0, 0.1)])
def test_breadcrumbs_bands_the_whole_flattened_tensor(method: str, consensus: bool, density: float,
                                                      gamma: float) -> None:
    ds, weights = deltas(seed=3), [0.5, 1.0, 0.25]
    reference = mk_combine([mk_outliers(d, density, gamma) for d in ds], weights, consensus, normalize=False)
    assert torch.equal(ours(method, ds, weights, {"density": density, "gamma": gamma}), reference)
    params = get_method(method).resolve_params({**convention_defaults(method, "mergekit"), "density": density,
                                                "gamma": gamma})
    assert not get_method(method).rows.supports(params)  # a whole-tensor band is not row-local


def test_row_band_and_tensor_band_differ() -> None:
    ds = deltas(seed=4)
    row = ours("breadcrumbs", ds, [1, 1, 1], {"density": 0.4, "gamma": 0.05, "band": "row"})
    tensor = ours("breadcrumbs", ds, [1, 1, 1], {"density": 0.4, "gamma": 0.05})
    assert not torch.equal(row, tensor)


@pytest.mark.parametrize("method,consensus", [("dare_linear", False), ("dare_ties", True)])
def test_dare_restores_each_deltas_l1_norm(method: str, consensus: bool) -> None:
    """The masks come from streammerge's seeded generator (mergekit's from torch's global one);
    given the mask, mergekit's L1 rescale and combination must hold exactly."""
    ds, weights, density, seed = deltas(seed=5), [0.5, 0.8, 0.3], 0.4, 9
    drop = RandomDrop(density, torch.Generator().manual_seed(seed), len(ds), "l1")  # the method's seeding
    masks = [drop.mask(torch.Size(SHAPE), i) for i in range(len(ds))]
    kept = sum(float(m.mean()) for m in masks) / len(masks)
    assert abs(kept - density) < 0.05
    # mergekit rescales the unweighted delta then weighs it; we weigh first: equal up to rounding.
    reference = mk_combine([mk_l1(d, m) for d, m in zip(ds, masks)], weights, consensus, normalize=False)
    result = ours(method, ds, weights, {"density": density}, seed=seed)
    torch.testing.assert_close(result, reference, rtol=2e-6, atol=1e-6)
    for d, m in zip(ds, masks):  # each sparsified delta keeps its L1 norm
        torch.testing.assert_close(mk_l1(d, m).abs().sum(), d.abs().sum())


def test_dare_without_rescale_only_drops() -> None:
    ds, weights, seed = deltas(seed=6), [1.0, 1.0, 1.0], 3
    drop = RandomDrop(0.5, torch.Generator().manual_seed(seed), len(ds), "none")
    reference = sum(d * drop.mask(torch.Size(SHAPE), i) for i, d in enumerate(ds))
    result = ours("dare_linear", ds, weights, {"density": 0.5, "rescale": "none"}, seed=seed)
    assert torch.equal(result, reference)
    assert torch.equal(blocks("dare_linear", ds, weights, {"density": 0.5, "rescale": "none"}, seed=seed), reference)


@pytest.mark.parametrize("lam", [1.0, 0.7])
def test_task_arithmetic_weights_sums_divides_then_scales(lam: float) -> None:
    ds, weights = deltas(seed=7), [0.3, 0.9, 0.4]
    plain = ours("task_arithmetic", ds, weights, {"lambda": lam})
    assert torch.equal(plain, mk_combine(ds, weights, False, normalize=False, lam=lam))
    normalized = ours("task_arithmetic", ds, weights, {"lambda": lam, "normalize": "weights"})
    assert torch.equal(normalized, mk_combine(ds, weights, False, normalize=True, lam=lam))


def test_non_electing_normalize_divides_by_all_weights_in_both_forms() -> None:
    ds, weights = deltas(seed=8), [0.3, 0.9, 0.4]
    reference = mk_combine([mk_magnitude(d, 0.5) for d in ds], weights, False, normalize=True)
    given = {"density": 0.5, "normalize": "weights"}
    assert torch.equal(ours("magnitude_prune", ds, weights, given), reference)
    assert torch.equal(blocks("magnitude_prune", ds, weights, given), reference)


def test_rescale_l1_applies_to_magnitude_trims_too() -> None:
    ds, weights = deltas(seed=9), [0.5, 0.5, 1.0]
    masks = [(mk_magnitude(d, 0.3) != 0).float() for d in ds]
    reference = mk_combine([mk_l1(d, m) for d, m in zip(ds, masks)], weights, True, normalize=True)
    result = ours("ties", ds, weights, {"density": 0.3, "rescale": "l1"})
    torch.testing.assert_close(result, reference, rtol=2e-6, atol=1e-6)
