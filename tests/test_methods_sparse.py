"""TIES, DARE, Breadcrumbs, magnitude pruning: hand-worked examples and independent references."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest
import torch

from streammerge.methods import DenseUpdate, MergeInputs, TaskUpdate, get_method
from streammerge.methods.orthogonalize import OrthoSettings, orthogonalize_updates
from streammerge.methods.sparsify import RandomDrop
from tests.helpers import random_lora as lora

TOL = {"rtol": 1e-4, "atol": 1e-5}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def inputs_of(updates: Sequence[TaskUpdate], weights: Sequence[float] | None = None, seed: int = 0) -> MergeInputs:
    shape = updates[0].dense().shape
    return MergeInputs("w", torch.randn(shape), tuple(updates), tuple(weights or [1.0] * len(updates)),
                       torch.Generator().manual_seed(seed))


def run(method: str, updates: Sequence[TaskUpdate], weights: Sequence[float] | None = None, seed: int = 0,
        **params: object) -> torch.Tensor:
    m = get_method(method)
    return m.merge(inputs_of(updates, weights, seed), m.resolve_params(params)).update.dense()


# ---- independent references -------------------------------------------------------------------------

def ref_trim(t: torch.Tensor, density: float) -> torch.Tensor:
    k = int(density * t.numel())
    out = torch.zeros_like(t).flatten()
    if k:
        idx = t.abs().flatten().topk(k).indices
        out[idx] = t.flatten()[idx]
    return out.reshape(t.shape)


def ref_band(t: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    rows = t.reshape(-1, t.shape[-1])
    n = rows.shape[1]
    drop, keep = int(gamma * n), int(density * n)
    order = rows.abs().argsort(dim=1, descending=True)
    mask = torch.zeros_like(rows, dtype=torch.bool)
    mask.scatter_(1, order[:, drop:drop + keep], True)
    return (rows * mask).reshape(t.shape)


def ref_ties_combine(trimmed: Sequence[torch.Tensor]) -> torch.Tensor:
    stacked = torch.stack(list(trimmed))
    sign = torch.where(stacked.sum(0) >= 0, 1.0, -1.0)
    agree = (stacked != 0) & (torch.sign(stacked) == sign)
    return (stacked * agree).sum(0) / agree.sum(0).clamp(min=1)


# ---- TIES ----------------------------------------------------------------------------------------

def test_ties_hand_worked_example() -> None:
    taus = [torch.tensor([[4.0, -1.0, 0.5], [2.0, -3.0, 0.1]]),
            torch.tensor([[-5.0, 2.0, 0.2], [1.0, -1.0, 3.0]]),
            torch.tensor([[3.0, 0.1, -4.0], [-2.0, 0.3, 0.2]])]
    # trim to top 3 of 6: [[4,0,0],[2,-3,0]], [[-5,2,0],[0,0,3]], [[3,0,-4],[-2,0,0]]
    # sum [[2,2,-4],[0,-3,3]] → signs [[+,+,-],[+(tie),-,+]]; mean of agreeing non-zeros:
    expected = torch.tensor([[3.5, 2.0, -4.0], [2.0, -3.0, 3.0]])
    got = run("ties", [DenseUpdate(t) for t in taus], density=0.5)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(run("ties", [DenseUpdate(t) for t in taus], density=0.5, **{"lambda": 0.5}),
                               0.5 * expected)


@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
def test_ties_equals_reference(density: float) -> None:
    updates = [lora(12, 20, 3, 1), lora(12, 20, 5, 2), lora(12, 20, 2, 3)]
    weights = [1.0, 0.5, 2.0]
    got = run("ties", updates, weights, density=density)
    expected = ref_ties_combine([ref_trim(w * u.dense(), density) for u, w in zip(updates, weights)])
    torch.testing.assert_close(got, expected, **TOL)


def test_ties_one_input_full_density_is_the_input() -> None:
    update = lora(6, 9, 2, 4)
    torch.testing.assert_close(run("ties", [update], density=1.0), update.dense(), **TOL)


def test_ties_on_biases_is_elementwise() -> None:
    biases = [DenseUpdate(torch.randn(10)), DenseUpdate(torch.randn(10))]
    inputs = MergeInputs("b", torch.randn(10), tuple(biases), (1.0, 1.0), torch.Generator())
    m = get_method("ties")
    got = m.merge(inputs, m.resolve_params({"density": 0.5})).update.dense()
    torch.testing.assert_close(got, ref_ties_combine([ref_trim(b.delta, 0.5) for b in biases]), **TOL)


def test_magnitude_prune_equals_reference() -> None:
    updates: list[TaskUpdate] = [lora(10, 14, 3, 5), DenseUpdate(torch.randn(10, 14))]
    got = run("magnitude_prune", updates, [1.0, -2.0], density=0.3, **{"lambda": 0.8})
    expected = 0.8 * (ref_trim(updates[0].dense(), 0.3) + ref_trim(-2.0 * updates[1].dense(), 0.3))
    torch.testing.assert_close(got, expected, **TOL)


# ---- DARE ----------------------------------------------------------------------------------------

def test_dare_is_deterministic_per_seed() -> None:
    updates = [lora(10, 12, 3, 6), lora(10, 12, 3, 7)]
    for method in ("dare_linear", "dare_ties"):
        first = run(method, updates, seed=5, density=0.3)
        assert torch.equal(first, run(method, updates, seed=5, density=0.3))
        assert not torch.equal(first, run(method, updates, seed=6, density=0.3))


def test_dare_keeps_a_density_fraction_rescaled() -> None:
    update = DenseUpdate(torch.randn(64, 64) + 3)  # no zeros
    got = run("dare_linear", [update], density=0.25)
    kept = got != 0
    torch.testing.assert_close(got[kept], update.delta[kept] / 0.25)
    fraction = float(kept.float().mean())
    assert abs(fraction - 0.25) < 4 * math.sqrt(0.25 * 0.75 / 4096)


def test_dare_is_unbiased_in_expectation() -> None:
    updates = [DenseUpdate(torch.randn(8, 8)), lora(8, 8, 2, 8)]
    expected = updates[0].delta + updates[1].dense()
    seeds = 400
    mean = sum(run("dare_linear", updates, seed=s, density=0.5) for s in range(seeds)) / seeds
    # each entry is a mean of 400 draws with std |Δ_1|·1 + …: stay within 5σ
    sigma = (updates[0].delta.abs() + updates[1].dense().abs()) * math.sqrt((1 - 0.5) / 0.5 / seeds)
    assert ((mean - expected).abs() <= 5 * sigma + 1e-5).all()


def test_dare_ties_equals_ties_on_the_dare_masks() -> None:
    updates = [lora(10, 12, 3, 9), lora(10, 12, 4, 10), DenseUpdate(torch.randn(10, 12))]
    got = run("dare_ties", updates, seed=3, density=0.4)
    drop = RandomDrop(0.4, torch.Generator().manual_seed(3), len(updates))  # the documented seeding
    dropped = [u.dense() * drop.mask(torch.Size([10, 12]), i) / 0.4 for i, u in enumerate(updates)]
    torch.testing.assert_close(got, ref_ties_combine(dropped), **TOL)


def test_dare_ties_density_one_is_ties_density_one() -> None:
    updates = [lora(10, 12, 3, 11), lora(10, 12, 4, 12)]
    torch.testing.assert_close(run("dare_ties", updates, density=1.0), run("ties", updates, density=1.0))


# ---- Breadcrumbs -----------------------------------------------------------------------------------

def test_breadcrumbs_hand_worked_example() -> None:
    row = torch.tensor([[10.0, -9.0, 8.0, 1.0, 2.0, -7.0, 0.5, 3.0, -0.1, 4.0]])
    # drop the largest 10% (10), keep the next 30% (-9, 8, -7)
    expected = torch.tensor([[0.0, -9.0, 8.0, 0.0, 0.0, -7.0, 0.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(run("breadcrumbs", [DenseUpdate(row)], density=0.3, gamma=0.1), expected)
    torch.testing.assert_close(run("breadcrumbs", [DenseUpdate(row), DenseUpdate(-row)], density=0.3, gamma=0.1),
                               torch.zeros_like(row))


@pytest.mark.parametrize(("method", "combine"), [("breadcrumbs", None), ("breadcrumbs_ties", ref_ties_combine)])
def test_breadcrumbs_equals_reference(method: str, combine: object) -> None:
    updates: list[TaskUpdate] = [lora(8, 50, 3, 13), lora(8, 50, 2, 14), DenseUpdate(torch.randn(8, 50))]
    got = run(method, updates, density=0.3, gamma=0.04, **{"lambda": 0.9})
    bands = [ref_band(u.dense(), 0.3, 0.04) for u in updates]
    expected = 0.9 * (sum(bands) if combine is None else ref_ties_combine(bands))
    torch.testing.assert_close(got, expected, **TOL)


# ---- composition with DO-Merging components ----------------------------------------------------------

@pytest.mark.parametrize("axis", ["row", "col", "matrix"])
def test_ties_on_decoupled_directions(axis: str) -> None:
    updates = [lora(12, 16, 3, 15), lora(12, 16, 4, 16)]
    got = run("ties", updates, density=0.5, decouple=True, norm_axis=axis)
    dims = {"row": 1, "col": 0}
    deltas = [u.dense() for u in updates]
    mags = [d.norm(dim=dims[axis], keepdim=True) if axis in dims else d.norm().reshape(1, 1) for d in deltas]
    directions = [d / m for d, m in zip(deltas, mags)]
    expected = torch.stack(mags).mean(0) * ref_ties_combine([ref_trim(d, 0.5) for d in directions])
    torch.testing.assert_close(got, expected, **TOL)


@pytest.mark.parametrize("method", ["ties", "breadcrumbs", "breadcrumbs_ties", "dare_ties"])
def test_orthogonalize_first_then_method(method: str) -> None:
    updates = [lora(12, 40, 3, 17), lora(12, 40, 4, 18)]
    m = get_method(method)
    params = m.resolve_params({"orthogonalize": True, "steps": 20, "density": 0.5})
    result = m.merge(inputs_of(updates), params)
    ortho, stats = orthogonalize_updates(updates, OrthoSettings.from_params(params), "w")
    torch.testing.assert_close(result.update.dense(), m.merge(inputs_of(ortho), {**params, "orthogonalize": False})
                               .update.dense(), **TOL)
    assert result.stats == pytest.approx(stats)
    assert stats["ortho_cross_gram_A_after"] < stats["ortho_cross_gram_A_before"]


@pytest.mark.parametrize("axis", ["row", "col", "matrix"])
@pytest.mark.parametrize("method", ["ties", "dare_ties", "breadcrumbs", "breadcrumbs_ties"])
def test_components_on_full_fine_tunes_and_biases(method: str, axis: str) -> None:
    m = get_method(method)
    params = m.resolve_params({"orthogonalize": True, "decouple": True, "norm_axis": axis, "steps": 5, "density": 0.5})
    mixed: tuple[TaskUpdate, ...] = (lora(12, 20, 3, 19), DenseUpdate(torch.randn(20, 12).T))
    biases: tuple[TaskUpdate, ...] = (DenseUpdate(torch.randn(12)), DenseUpdate(torch.randn(12)))
    for base, updates in ((torch.randn(12, 20), mixed), (torch.randn(12), biases)):
        result = m.merge(MergeInputs("w", base, updates, (1.0, 2.0), torch.Generator().manual_seed(0)), params)
        assert result.update.dense().shape == base.shape and torch.isfinite(result.update.dense()).all()
    # Biases skip orthogonalize/decouple: element-wise, like the method with both off.
    plain = m.merge(MergeInputs("w", torch.randn(12), biases, (1.0, 2.0), torch.Generator().manual_seed(0)),
                    {**params, "orthogonalize": False, "decouple": False})
    torch.testing.assert_close(result.update.dense(), plain.update.dense())


@pytest.mark.parametrize("case", ["normal", "few_distinct", "constant", "heavy_tail"])
@pytest.mark.parametrize("fraction", [1e-6, 0.2, 0.5, 0.999, 1.0])
def test_kth_largest_is_exact_on_large_inputs(case: str, fraction: float) -> None:
    from streammerge.methods.sparsify import SELECT_SAMPLE, kth_largest

    g = torch.Generator().manual_seed(3)
    n = 4 * SELECT_SAMPLE + 17
    values = {"normal": lambda: torch.randn(n, generator=g).abs(),
              "few_distinct": lambda: torch.randint(0, 5, (n,), generator=g).float(),
              "constant": lambda: torch.full((n,), 0.25),
              "heavy_tail": lambda: torch.randn(n, generator=g).abs().pow(8)}[case]()
    k = max(1, int(fraction * n))
    assert float(kth_largest(values, k)) == float(values.sort(descending=True).values[k - 1])


def test_kth_largest_falls_back_when_the_bracket_misses(monkeypatch) -> None:
    from streammerge.methods import sparsify

    values = torch.randn(5 * sparsify.SELECT_SAMPLE, generator=torch.Generator().manual_seed(4))
    monkeypatch.setattr(sparsify, "SELECT_MARGIN", 0.0)  # a zero-width bracket almost never holds it
    for k in (1, 1234, values.numel() // 3, values.numel()):
        assert float(sparsify.kth_largest(values, k)) == float(values.sort(descending=True).values[k - 1])
