"""DO-Merging against dense references written straight from ALGORITHMS.md."""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Sequence

import pytest
import torch

from streammerge.errors import StreamMergeError
from streammerge.methods import DenseUpdate, LowRankUpdate, MergeInputs, TaskUpdate, get_method
from streammerge.methods.orthogonalize import OrthoSettings, orthogonalize_rows, orthogonalize_updates
from tests.helpers import random_lora as lora

TOL = {"rtol": 2e-4, "atol": 2e-5}
METHOD = get_method("do_merging")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


SPEC = {"cross_loss": "squared", "lr": 1e-3, "mu": 1.0, "max_delta": 0.2, "on_max_delta": "warn_skip"}
"""ALGORITHMS.md's orthogonalization settings (the defaults until 2026-12-03): what the references below compute."""


def inputs_of(updates: Sequence[TaskUpdate], weights: Sequence[float] | None = None,
              base: torch.Tensor | None = None) -> MergeInputs:
    shape = updates[0].dense().shape
    return MergeInputs("layers.0.q_proj.weight", torch.randn(shape) if base is None else base, tuple(updates),
                       tuple(weights or [1.0] * len(updates)), torch.Generator().manual_seed(0))


def run(updates: Sequence[TaskUpdate], weights: Sequence[float] | None = None, **params: object) -> torch.Tensor:
    result = METHOD.merge(inputs_of(updates, weights), METHOD.resolve_params(params))
    return result.update.dense()


# ---- references, straight from the formulas -------------------------------------------------------

def ref_decouple(deltas: Sequence[torch.Tensor], axis: str, reduce: str = "sum", eps: float = 1e-6,
                 lam: float = 1.0) -> torch.Tensor:
    """m_i per axis, D_i = ΔW_i / m_i (0 where m_i <= eps·max m_i), λ · m̄ ⊙ reduce(D_i)."""
    def mag(d: torch.Tensor) -> torch.Tensor:
        return {"row": lambda: d.norm(dim=1, keepdim=True), "col": lambda: d.norm(dim=0, keepdim=True),
                "matrix": lambda: d.norm().reshape(1, 1)}[axis]()
    mags = [mag(d) for d in deltas]
    dirs = [torch.where(m > eps * m.max(), d / m, torch.zeros_like(d)) for d, m in zip(deltas, mags)]
    total = sum(dirs)
    if reduce == "mean":
        total = total / len(deltas)
    return lam * torch.stack(mags).mean(0) * total


def ref_orthogonalize(mats: Sequence[torch.Tensor], steps: int, lr: float = 1e-3, mu: float = 1.0,
                      search_space: str = "rowspace", cross_loss: str = "squared") -> list[torch.Tensor]:
    """Autograd + torch.optim.Adam on the spec's loss (``unsquared``: ‖·‖_F instead of ‖·‖_F² per pair).

    ``full``: δ_i = P_i · rms(X_i) (the documented lr units).  ``rowspace``: δ_i = Z_i Vᵀ · u_i with
    Vᵀ from the thin SVD of the stacked, Frobenius-normalised factors and u_i = ‖X_i‖/√(r_i·Σr).
    """
    norms = [m.norm() for m in mats]
    if search_space == "full":
        basis = [None] * len(mats)
        rms = [m.norm() / math.sqrt(m.numel()) for m in mats]
        ps = [torch.zeros_like(m, requires_grad=True) for m in mats]
    else:
        vt = torch.linalg.svd(torch.cat([m / m.norm() for m in mats]), full_matrices=False).Vh
        total = vt.shape[0]
        basis = [vt] * len(mats)
        rms = [m.norm() / math.sqrt(m.shape[0] * total) for m in mats]
        ps = [torch.zeros(m.shape[0], total, requires_grad=True) for m in mats]
    opt = torch.optim.Adam(ps, lr=lr, eps=1e-12)

    def delta(p: torch.Tensor, unit: torch.Tensor, qt: torch.Tensor | None) -> torch.Tensor:
        return (p if qt is None else p @ qt) * unit

    def perturbed(m: torch.Tensor, p: torch.Tensor, unit: torch.Tensor, qt: torch.Tensor | None) -> torch.Tensor:
        return m + delta(p, unit, qt)

    for _ in range(steps):
        opt.zero_grad()
        x = [perturbed(m, p, r, qt) for m, p, r, qt in zip(mats, ps, rms, basis)]
        power = {"squared": 2, "unsquared": 1}[cross_loss]
        loss = sum((x[i] @ x[j].T).norm() ** power / (norms[i] * norms[j]) ** power
                   for i in range(len(x)) for j in range(len(x)) if i != j)
        loss = loss + mu * sum(delta(p, r, qt).square().sum() / n ** 2 for p, r, qt, n in zip(ps, rms, basis, norms))
        loss.backward()
        opt.step()
    return [perturbed(m, p, r, qt).detach() for m, p, r, qt in zip(mats, ps, rms, basis)]


def cross_gram(mats: Sequence[torch.Tensor]) -> float:
    return math.sqrt(sum(float(((mats[i] / mats[i].norm()) @ (mats[j] / mats[j].norm()).T).square().sum())
                         for i in range(len(mats)) for j in range(len(mats)) if i != j))


# ---- decouple (orthogonalize off) --------------------------------------------------------------------

@pytest.mark.parametrize("axis", ["row", "col", "matrix"])
@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_lora_fast_path_equals_dense_reference(axis: str, reduce: str) -> None:
    updates = [lora(24, 32, 4, 1), lora(24, 32, 2, 2, scale=3.0), lora(24, 32, 6, 3, scale=0.5)]
    result = METHOD.merge(inputs_of(updates), METHOD.resolve_params(
        {"orthogonalize": False, "norm_axis": axis, "direction_reduce": reduce, "lambda": 0.7}))
    assert isinstance(result.update, LowRankUpdate) and result.update.rank == 12  # exact rank Σ r_i
    expected = ref_decouple([u.dense() for u in updates], axis, reduce, lam=0.7)
    torch.testing.assert_close(result.update.dense(), expected, **TOL)


@pytest.mark.parametrize("axis", ["row", "col", "matrix"])
def test_dense_and_mixed_inputs_equal_dense_reference(axis: str) -> None:
    updates: list[TaskUpdate] = [DenseUpdate(torch.randn(24, 32)), lora(24, 32, 3, 4), DenseUpdate(torch.randn(24, 32))]
    got = run(updates, orthogonalize=False, norm_axis=axis)
    torch.testing.assert_close(got, ref_decouple([u.dense() for u in updates], axis), **TOL)


def test_weights_are_folded_into_the_updates() -> None:
    updates = [lora(10, 14, 3, 5), lora(10, 14, 3, 6)]
    got = run(updates, [2.0, -0.5], orthogonalize=False)
    expected = ref_decouple([2.0 * updates[0].dense(), -0.5 * updates[1].dense()], "row")
    torch.testing.assert_close(got, expected, **TOL)


def test_identical_directions_give_mean_magnitudes() -> None:
    base = lora(16, 20, 4, 7).dense()
    direction = base / base.norm(dim=1, keepdim=True)
    scales = [torch.rand(16, 1) + 0.5 for _ in range(3)]
    updates = [DenseUpdate(c * base) for c in scales]
    got = run(updates, orthogonalize=False, direction_reduce="mean")
    expected_magnitude = torch.stack([c * base.norm(dim=1, keepdim=True) for c in scales]).mean(0)
    torch.testing.assert_close(got.norm(dim=1, keepdim=True), expected_magnitude, **TOL)
    torch.testing.assert_close(got, expected_magnitude * direction, **TOL)
    torch.testing.assert_close(run(updates, orthogonalize=False), 3 * got, **TOL)  # sum = T × mean


@pytest.mark.parametrize("orthogonalize", [True, False])
def test_one_task_is_task_arithmetic(orthogonalize: bool) -> None:
    update = lora(12, 18, 4, 8)
    result = METHOD.merge(inputs_of([update]), METHOD.resolve_params({"orthogonalize": orthogonalize, "lambda": 0.5}))
    torch.testing.assert_close(result.update.dense(), 0.5 * update.dense(), **TOL)
    assert result.stats.get("ortho_steps", 0.0) == 0.0


def test_both_switches_off_is_task_arithmetic() -> None:
    updates = [lora(12, 18, 4, 9), lora(12, 18, 2, 10)]
    got = run(updates, [1.0, 2.0], orthogonalize=False, decouple=False, **{"lambda": 0.3})
    torch.testing.assert_close(got, 0.3 * (updates[0].dense() + 2.0 * updates[1].dense()), **TOL)


def test_tiny_rows_get_no_direction() -> None:
    a, b = lora(8, 12, 2, 11), lora(8, 12, 2, 12)
    a.up[3] = 0  # task a leaves output row 3 alone
    b.up[5] *= 1e-9  # below eps · max: treated as 0
    got = run([a, b], orthogonalize=False)
    expected = ref_decouple([a.dense(), b.dense()], "row")
    torch.testing.assert_close(got, expected, **TOL)
    assert torch.isfinite(got).all()
    # Row 3: only b's direction, at half b's magnitude (m̄ averages a's zero in).
    torch.testing.assert_close(got[3], 0.5 * b.dense()[3], **TOL)


def test_untrained_adapter_with_zero_b_is_harmless() -> None:
    zero = LowRankUpdate(up=torch.zeros(10, 4), down=torch.randn(4, 16))
    other = lora(10, 16, 4, 13)
    result = METHOD.merge(inputs_of([zero, other]), METHOD.resolve_params({}))
    # Only one task has a non-zero update: nothing to orthogonalize against; m̄ averages in the 0.
    assert result.stats["ortho_steps"] == 0.0
    torch.testing.assert_close(result.update.dense(), 0.5 * other.dense(), **TOL)


# ---- orthogonalize ---------------------------------------------------------------------------------

def overlapping_loras(d_out: int = 20, d_in: int = 48, ranks: Sequence[int] = (4, 3, 5),
                      shared: float = 0.5) -> list[LowRankUpdate]:
    """LoRAs whose A's share a common component, so their row spaces overlap."""
    common = torch.randn(max(ranks), d_in, generator=torch.Generator().manual_seed(99))
    out = []
    for k, r in enumerate(ranks):
        u = lora(d_out, d_in, r, 20 + k)
        out.append(LowRankUpdate(up=u.up, down=(1 - shared) * u.down + shared * common[:r]))
    return out


@pytest.mark.parametrize("cross_loss", ["squared", "unsquared"])
@pytest.mark.parametrize("search_space", ["rowspace", "full"])
def test_adam_descent_equals_autograd_reference(search_space: str, cross_loss: str) -> None:
    mats = [u.down for u in overlapping_loras()]
    settings = OrthoSettings(steps=60, lr=3e-3, mu=0.5, search_space=search_space, cross_loss=cross_loss)
    side = orthogonalize_rows(mats, settings)
    want = ref_orthogonalize(mats, steps=60, lr=3e-3, mu=0.5, search_space=search_space, cross_loss=cross_loss)
    for got, expected in zip(side.factors, want):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_unsquared_cross_loss_removes_more_overlap_at_the_same_penalty() -> None:
    """The unsquared cross term's gradient does not fade with the overlap: at equal μ and budget it
    ends closer to orthogonal (and moves the factors further) than the squared one."""
    mats = [u.down for u in overlapping_loras(d_in=200, shared=0.3)]
    settings = {"steps": 400, "lr": 3e-3, "mu": 1.0, "max_delta": 1.0}
    squared = orthogonalize_rows(mats, OrthoSettings(**settings, cross_loss="squared"))
    unsquared = orthogonalize_rows(mats, OrthoSettings(**settings, cross_loss="unsquared"))
    assert squared.cross_before == unsquared.cross_before
    assert unsquared.cross_after < 0.5 * squared.cross_after
    assert unsquared.delta_max > squared.delta_max


def test_rowspace_search_stays_in_the_row_span_and_matches_full_search_loss() -> None:
    mats = [u.down for u in overlapping_loras(d_in=200, shared=0.3)]
    stacked = torch.cat(mats)
    projector = torch.linalg.pinv(stacked) @ stacked  # onto the row span, [d, d]
    results = {space: orthogonalize_rows(mats, OrthoSettings(search_space=space)) for space in ("rowspace", "full")}
    for got, x in zip(results["rowspace"].factors, mats):
        delta = got - x
        torch.testing.assert_close(delta @ projector, delta, rtol=1e-4, atol=1e-6)
    # A full-space δ leaves the span (Adam's per-element scaling), which only costs penalty.
    leaks = [float((f - x - (f - x) @ projector).norm() / (f - x).norm()) for f, x in zip(results["full"].factors, mats)]
    assert max(leaks) > 0.1
    after = {space: r.cross_after for space, r in results.items()}
    assert after["rowspace"] < 0.9 * results["rowspace"].cross_before
    assert after["rowspace"] == pytest.approx(after["full"], rel=0.15)


@pytest.mark.parametrize("axis", ["row", "col", "matrix"])
def test_orthogonalize_then_decouple_equals_dense_reference(axis: str) -> None:
    updates = overlapping_loras()
    result = METHOD.merge(inputs_of(updates), METHOD.resolve_params({**SPEC, "norm_axis": axis, "steps": 50}))
    a_hat = ref_orthogonalize([u.down for u in updates], steps=50)
    bt_hat = ref_orthogonalize([u.up.T for u in updates], steps=50)
    expected = ref_decouple([bt.T @ a for bt, a in zip(bt_hat, a_hat)], axis)
    assert isinstance(result.update, LowRankUpdate) and result.update.rank == 12
    torch.testing.assert_close(result.update.dense(), expected, rtol=5e-4, atol=5e-5)


def test_orthogonalize_lowers_cross_gram_within_max_delta() -> None:
    updates = overlapping_loras(shared=0.3)
    new, stats = orthogonalize_updates(updates, OrthoSettings(**SPEC))
    for side, get in (("A", lambda u: u.down), ("B", lambda u: u.up.T)):
        before, after = cross_gram([get(u) for u in updates]), cross_gram([get(u) for u in new])
        assert after < 0.8 * before
        assert stats[f"ortho_cross_gram_{side}_before"] == pytest.approx(before, rel=1e-4)
        assert stats[f"ortho_cross_gram_{side}_after"] == pytest.approx(after, rel=1e-4)
        ratios = [float((get(n) - get(u)).norm() / get(u).norm()) for u, n in zip(updates, new)]
        assert 0 < max(ratios) <= 0.2
        assert stats[f"ortho_delta_{side}_max"] == pytest.approx(max(ratios), rel=1e-3)
        assert stats[f"ortho_skipped_{side}"] == 0.0
    assert stats["ortho_steps"] == 200.0


def test_defaults_remove_nearly_all_overlap_within_max_delta() -> None:
    """The defaults (unsquared cross loss, lr 3e-2, μ 0.01, max_delta 1, clip) go near orthogonal in 200 steps,
    further than the spec's settings, and never past max_delta."""
    updates = overlapping_loras(shared=0.3)
    new, stats = orthogonalize_updates(updates, OrthoSettings())
    _, spec_stats = orthogonalize_updates(updates, OrthoSettings(**SPEC))
    assert stats["ortho_steps"] == 200.0
    for side, get in (("A", lambda u: u.down), ("B", lambda u: u.up.T)):
        before, after = cross_gram([get(u) for u in updates]), cross_gram([get(u) for u in new])
        assert after < 0.05 * before and after < 0.1 * spec_stats[f"ortho_cross_gram_{side}_after"]
        ratios = [float((get(n) - get(u)).norm() / get(u).norm()) for u, n in zip(updates, new)]
        assert 0 < max(ratios) <= 1.0 + 1e-6
        assert stats[f"ortho_skipped_{side}"] == 0.0


@pytest.mark.parametrize("sides", ["A", "B"])
def test_one_side_only_leaves_the_other_as_trained(sides: str) -> None:
    updates = overlapping_loras(shared=0.3)
    both, _ = orthogonalize_updates(updates, OrthoSettings())
    new, stats = orthogonalize_updates(updates, OrthoSettings(sides=sides))
    other = "B" if sides == "A" else "A"
    for u, b, n in zip(updates, both, new):
        kept, moved = (n.up, n.down) if sides == "A" else (n.down, n.up)
        torch.testing.assert_close(kept, u.up if sides == "A" else u.down, rtol=0, atol=0)
        torch.testing.assert_close(moved, b.down if sides == "A" else b.up)  # each side is its own problem
    assert stats["ortho_steps"] == 200.0 and stats[f"ortho_cross_gram_{other}_before"] == 0.0
    assert stats[f"ortho_cross_gram_{sides}_after"] < 0.8 * stats[f"ortho_cross_gram_{sides}_before"]


def test_max_delta_policies() -> None:
    updates = overlapping_loras(shared=0.9)  # needs a large δ to separate
    params = {**SPEC, "max_delta": 0.01, "steps": 40}
    with pytest.warns(RuntimeWarning) as record:
        skipped = METHOD.merge(inputs_of(updates), METHOD.resolve_params(params))
    messages = [str(w.message) for w in record]
    assert len(messages) == 2
    for side, message in zip("AB", messages):
        assert re.fullmatch(rf"tensor 'layers.0.q_proj.weight': orthogonalizing the {side} factors needs "
                            rf"‖δ‖/‖{side}‖ = [0-9.e-]+, above max_delta=0.01; leaving the {side} factors unchanged",
                            message), message
    assert skipped.stats["ortho_skipped_A"] == skipped.stats["ortho_skipped_B"] == 1.0
    assert skipped.stats["ortho_cross_gram_A_after"] == skipped.stats["ortho_cross_gram_A_before"]

    clipped = METHOD.merge(inputs_of(updates), METHOD.resolve_params({**params, "on_max_delta": "clip"}))
    for side in "AB":
        assert clipped.stats[f"ortho_skipped_{side}"] == 0.0
        assert clipped.stats[f"ortho_delta_{side}_max"] == pytest.approx(0.01, rel=1e-4)
        assert clipped.stats[f"ortho_cross_gram_{side}_after"] < clipped.stats[f"ortho_cross_gram_{side}_before"]

    with pytest.raises(StreamMergeError, match=r"above max_delta=0.01; raise max_delta or mu, or set on_max_delta "
                                               r"to warn_skip or clip"):
        METHOD.merge(inputs_of(updates), METHOD.resolve_params({**params, "on_max_delta": "error"}))


def test_skipped_orthogonalization_equals_decouple_alone() -> None:
    updates = overlapping_loras(shared=0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        result = METHOD.merge(inputs_of(updates), METHOD.resolve_params({"max_delta": 0.0, "on_max_delta": "warn_skip"}))
    assert result.stats["ortho_skipped_A"] == result.stats["ortho_skipped_B"] == 1.0
    torch.testing.assert_close(result.update.dense(), run(updates, orthogonalize=False), **TOL)


def test_full_fine_tunes_orthogonalize_through_svd_factors() -> None:
    taus = [torch.randn(16, 24) + 2 * torch.outer(torch.randn(16), torch.randn(24)) for _ in range(2)]
    result = METHOD.merge(inputs_of([DenseUpdate(t) for t in taus]), METHOD.resolve_params({**SPEC, "svd_rank": 3, "steps": 30}))
    # Reference: balanced rank-3 SVD factors, orthogonalized, the SVD tail kept.
    factors = []
    for t in taus:
        u, s, vh = torch.linalg.svd(t, full_matrices=False)
        factors.append((u[:, :3] * s[:3].sqrt(), s[:3].sqrt()[:, None] * vh[:3]))
    a_hat = ref_orthogonalize([a for _, a in factors], steps=30)
    bt_hat = ref_orthogonalize([b.T for b, _ in factors], steps=30)
    new = [t - b @ a + bt.T @ ah for t, (b, a), ah, bt in zip(taus, factors, a_hat, bt_hat)]
    assert isinstance(result.update, DenseUpdate)
    torch.testing.assert_close(result.update.delta, ref_decouple(new, "row"), rtol=5e-4, atol=5e-5)
    assert result.stats["ortho_cross_gram_B_after"] < result.stats["ortho_cross_gram_B_before"]


def test_mixed_lora_and_full_fine_tune() -> None:
    updates: list[TaskUpdate] = [lora(16, 24, 4, 30), DenseUpdate(torch.randn(16, 24))]
    result = METHOD.merge(inputs_of(updates), METHOD.resolve_params({"svd_rank": 4, "steps": 20}))
    assert isinstance(result.update, DenseUpdate) and torch.isfinite(result.update.delta).all()
    assert result.stats["ortho_steps"] == 20.0


def test_runs_under_inference_mode() -> None:
    updates = overlapping_loras()
    with torch.inference_mode():
        got = METHOD.merge(inputs_of(updates), METHOD.resolve_params({"steps": 10})).update.dense()
    torch.testing.assert_close(got, run(updates, steps=10), **TOL)


def test_non_matrix_tensors_are_averaged() -> None:
    biases = [DenseUpdate(torch.randn(7)), DenseUpdate(torch.randn(7))]
    inputs = MergeInputs("layers.0.q_proj.bias", torch.randn(7), tuple(biases), (1.0, 3.0), torch.Generator())
    got = METHOD.merge(inputs, METHOD.resolve_params({})).update.dense()
    torch.testing.assert_close(got, (biases[0].delta + 3 * biases[1].delta) / 4, **TOL)


def test_inputs_are_not_modified() -> None:
    updates: list[TaskUpdate] = [lora(12, 16, 3, 40), DenseUpdate(torch.randn(12, 16))]
    before = [u.dense().clone() for u in updates]
    METHOD.merge(inputs_of(updates), METHOD.resolve_params({"steps": 10}))
    for u, b in zip(updates, before):
        assert torch.equal(u.dense(), b)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu() -> None:
    updates = overlapping_loras(d_out=64, d_in=128)
    cpu = METHOD.merge(inputs_of(updates), METHOD.resolve_params({}))
    cuda_updates = [LowRankUpdate(up=u.up.cuda(), down=u.down.cuda()) for u in updates]
    inputs = MergeInputs("w", torch.zeros(64, 128, device="cuda"), tuple(cuda_updates), (1.0,) * 3,
                         torch.Generator(device="cuda").manual_seed(0))
    gpu = METHOD.merge(inputs, METHOD.resolve_params({}))
    assert gpu.update.dense().device.type == "cuda"
    torch.testing.assert_close(gpu.update.dense().cpu(), cpu.update.dense(), rtol=1e-3, atol=1e-4)
    for key, value in cpu.stats.items():
        assert gpu.stats[key] == pytest.approx(value, rel=1e-3, abs=1e-6)


# ---- batched: many tensors at once -------------------------------------------------------------------

def _module_batch() -> list[MergeInputs]:
    """Tensors of mixed shapes and ranks (q/k/v/o/mlp-like), an untrained adapter (B = 0), one that
    needs a large δ (warn_skip on it alone), a dense input and a 1-D tensor."""
    shapes = [(64, 48), (16, 48), (64, 48), (96, 48), (48, 96), (64, 48)]
    batch = []
    for k, (d_out, d_in) in enumerate(shapes):
        ranks = (4, 4, 2) if k % 2 else (4, 4, 4)
        updates = [lora(d_out, d_in, r, seed=10 * k + i) for i, r in enumerate(ranks)]
        batch.append(inputs_of(updates, [1.0, 0.5, -0.7]))
    untrained = LowRankUpdate(up=torch.zeros(64, 4), down=torch.randn(4, 48))
    batch.append(inputs_of([lora(64, 48, 4, seed=90), untrained, lora(64, 48, 4, seed=91)]))
    hard = overlapping_loras(shared=0.97)
    batch.append(inputs_of(hard))
    batch.append(inputs_of([lora(64, 48, 4, seed=92), DenseUpdate(torch.randn(64, 48) * 0.1)]))
    batch.append(MergeInputs("layers.0.norm.weight", torch.randn(48), (DenseUpdate(torch.randn(48)),
                                                                        DenseUpdate(torch.randn(48))),
                             (1.0, 1.0), torch.Generator().manual_seed(0)))
    return batch


@pytest.mark.parametrize("search_space", ["rowspace", "full"])
def test_merge_many_equals_merge_per_tensor(search_space: str) -> None:
    """The batched problems (equal shapes and ranks stacked) give each tensor's own result."""
    params = METHOD.resolve_params({**SPEC, "search_space": search_space, "max_delta": 0.05, "steps": 60})
    batch = _module_batch()
    with warnings.catch_warnings(record=True) as batched_warnings:
        warnings.simplefilter("always", RuntimeWarning)
        batched = METHOD.merge_many(batch, params)
    with warnings.catch_warnings(record=True) as single_warnings:
        warnings.simplefilter("always", RuntimeWarning)
        single = [METHOD.merge(inputs, params) for inputs in batch]
    assert sorted(str(w.message) for w in batched_warnings) == sorted(str(w.message) for w in single_warnings)
    assert batched_warnings, "the hard tensor exceeded max_delta"
    for inputs, ours, ref in zip(batch, batched, single):
        torch.testing.assert_close(ours.update.dense(), ref.update.dense(), rtol=1e-5, atol=1e-6, msg=inputs.name)
        assert ours.stats.keys() == ref.stats.keys()
        for key, value in ref.stats.items():
            assert ours.stats[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


def test_orthogonalize_many_batches_equal_problems_only() -> None:
    """Problems are grouped by (ranks, width): a group's result equals each problem solved alone."""
    from streammerge.methods.orthogonalize import RowProblem, orthogonalize_many
    settings = OrthoSettings(steps=50)
    problems = [RowProblem([lora(1, 40, r, seed=s).down for s, r in zip(range(k, k + 3), ranks)], "A", f"t{k}")
                for k, ranks in enumerate([(4, 4, 4), (4, 2, 4), (4, 4, 4), (4, 4, 4), (4, 2, 4)])]
    batched = orthogonalize_many(problems, settings)
    for problem, ours in zip(problems, batched):
        ref = orthogonalize_rows(problem.mats, settings, problem.side, problem.name)
        for a, b in zip(ours.factors, ref.factors):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
        assert ours.cross_after == pytest.approx(ref.cross_after, rel=1e-5)
        assert ours.cross_after < ours.cross_before
