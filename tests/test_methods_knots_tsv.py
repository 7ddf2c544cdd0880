"""KnOTS and TSV-M: exact low-rank routes against dense-SVD references."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch

from streammerge.methods import DenseUpdate, LowRankUpdate, MergeInputs, MergeResult, TaskUpdate, get_method
from tests.helpers import random_lora as lora

TOL = {"rtol": 2e-4, "atol": 2e-5}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def merge(method: str, updates: Sequence[TaskUpdate], weights: Sequence[float] | None = None, seed: int = 0,
          **params: object) -> MergeResult:
    m = get_method(method)
    shape = updates[0].dense().shape
    inputs = MergeInputs("w", torch.randn(shape), tuple(updates), tuple(weights or [1.0] * len(updates)),
                         torch.Generator().manual_seed(seed))
    return m.merge(inputs, m.resolve_params(params))


def ref_ties(zs: Sequence[torch.Tensor], density: float) -> torch.Tensor:
    trimmed = []
    for z in zs:
        k = int(density * z.numel())
        flat = torch.zeros(z.numel())
        idx = z.abs().flatten().topk(k).indices
        flat[idx] = z.flatten()[idx]
        trimmed.append(flat.reshape(z.shape))
    stacked = torch.stack(trimmed)
    sign = torch.where(stacked.sum(0) >= 0, 1.0, -1.0)
    agree = (stacked != 0) & (torch.sign(stacked) == sign)
    return (stacked * agree).sum(0) / agree.sum(0).clamp(min=1)


def ref_knots(deltas: Sequence[torch.Tensor], density: float, lam: float) -> torch.Tensor:
    """Dense SVD of [ΔW_1 … ΔW_T], keep s > 1e-5·s_max, Z_i = column blocks of diag(s)Vᵀ, TIES, λ U Z*."""
    u, s, vh = torch.linalg.svd(torch.cat(list(deltas), dim=1), full_matrices=False)
    k = int((s > 1e-5 * s[0]).sum())
    zs = (torch.diag(s[:k]) @ vh[:k]).split(deltas[0].shape[1], dim=1)
    return lam * u[:, :k] @ ref_ties(zs, density)


def ref_tsv(deltas: Sequence[torch.Tensor], alpha: float) -> torch.Tensor:
    """Per-task dense SVD truncated at min(⌊min(d)/T⌋, rank), stacked, polar factors via SVD, α U⊥ diag(σ) V⊥ᵀ."""
    budget = min(deltas[0].shape) // len(deltas)
    us, ss, vs = [], [], []
    for d in deltas:
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        k = min(budget, int((s > 1e-5 * s[0]).sum()))
        us.append(u[:, :k]), ss.append(s[:k]), vs.append(vh[:k].T)

    def polar(m: torch.Tensor) -> torch.Tensor:
        p, _, qh = torch.linalg.svd(m, full_matrices=False)
        return p @ qh
    return alpha * polar(torch.cat(us, 1)) @ torch.diag(torch.cat(ss)) @ polar(torch.cat(vs, 1)).T


# ---- KnOTS ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("density", [1.0, 0.5])
def test_knots_equals_dense_reference(density: float) -> None:
    updates = [lora(20, 16, 3, 1), lora(20, 16, 5, 2), lora(20, 16, 2, 3)]
    result = merge("knots", updates, [1.0, 2.0, 0.5], density=density)
    assert isinstance(result.update, LowRankUpdate) and result.update.rank == 10
    assert result.stats["knots_rank"] == 10.0
    deltas = [w * u.dense() for u, w in zip(updates, [1.0, 2.0, 0.5])]
    torch.testing.assert_close(result.update.dense(), ref_knots(deltas, density, 0.5), **TOL)


def test_knots_dense_inputs_equal_dense_reference() -> None:
    updates: list[TaskUpdate] = [DenseUpdate(torch.randn(12, 8)), lora(12, 8, 2, 4)]
    result = merge("knots", updates, **{"lambda": 1.0})
    torch.testing.assert_close(result.update.dense(), ref_knots([u.dense() for u in updates], 1.0, 1.0), **TOL)


def test_knots_linear_variant_is_task_arithmetic() -> None:
    # With no trim and no election (a plain sum of the Z_i), U Σ Z_i = Σ ΔW_i exactly.
    updates = [lora(20, 16, 3, 5), lora(20, 16, 4, 6)]
    got = merge("knots", updates, [1.0, -0.5], variant="linear", **{"lambda": 0.7}).update.dense()
    torch.testing.assert_close(got, 0.7 * (updates[0].dense() - 0.5 * updates[1].dense()), **TOL)


def test_knots_default_one_adapter_is_lambda_times_update() -> None:
    update = lora(20, 16, 4, 7)
    torch.testing.assert_close(merge("knots", [update]).update.dense(), 0.5 * update.dense(), **TOL)


def test_knots_ties_with_density_one_still_elects_signs() -> None:
    # [ΔW, −½ΔW]: Z_2 = −½ Z_1, so every elected sign is Z_1's and the disjoint mean keeps only Z_1:
    # KnOTS gives λ ΔW where Task Arithmetic gives ½ ΔW.  (No trim ≠ Task Arithmetic.)
    update = lora(10, 8, 2, 8)
    opposite = LowRankUpdate(up=-0.5 * update.up, down=update.down)
    got = merge("knots", [update, opposite], **{"lambda": 1.0}).update.dense()
    torch.testing.assert_close(got, update.dense(), **TOL)
    torch.testing.assert_close(got, ref_knots([update.dense(), opposite.dense()], 1.0, 1.0), **TOL)


def test_knots_dare_variant_is_deterministic_per_seed() -> None:
    updates = [lora(20, 16, 3, 9), lora(20, 16, 4, 10)]
    a = merge("knots", updates, seed=1, variant="dare_ties", density=0.5).update.dense()
    assert torch.equal(a, merge("knots", updates, seed=1, variant="dare_ties", density=0.5).update.dense())
    assert not torch.equal(a, merge("knots", updates, seed=2, variant="dare_ties", density=0.5).update.dense())


# ---- TSV-M ----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("d_out", "d_in", "ranks"), [
    (24, 30, (3, 5, 2)),  # budget ⌊24/3⌋ = 8 > every rank: truncation at the true rank
    (9, 20, (4, 5)),  # budget ⌊9/2⌋ = 4 < 5: truncation by the budget
])
def test_tsv_equals_dense_reference(d_out: int, d_in: int, ranks: Sequence[int]) -> None:
    updates = [lora(d_out, d_in, r, 11 + k) for k, r in enumerate(ranks)]
    result = merge("tsv", updates, alpha=0.8)
    budget = min(d_out, d_in) // len(ranks)
    assert isinstance(result.update, LowRankUpdate)
    assert result.update.rank == sum(min(budget, r) for r in ranks)
    torch.testing.assert_close(result.update.dense(), ref_tsv([u.dense() for u in updates], 0.8), **TOL)


def test_tsv_truncates_a_rank_deficient_lora_at_its_true_rank() -> None:
    update = lora(24, 30, 6, 20)
    update.up[:, 3:] = 0  # a rank-6 LoRA of rank 3
    result = merge("tsv", [update, lora(24, 30, 2, 21)])
    assert result.update.rank == 3 + 2


def test_tsv_output_factors_are_orthogonal() -> None:
    updates = [lora(24, 30, 4, 22), lora(24, 30, 4, 23), DenseUpdate(lora(24, 30, 3, 24).dense())]
    update = merge("tsv", updates).update
    assert isinstance(update, LowRankUpdate)
    k = update.rank
    torch.testing.assert_close(update.down @ update.down.T, torch.eye(k), **TOL)  # V⊥ᵀ V⊥ = I
    u_orth = update.up / update.up.norm(dim=0)  # up = α U⊥ diag(σ): columns orthogonal, norms ασ
    torch.testing.assert_close(u_orth.T @ u_orth, torch.eye(k), **TOL)


def test_tsv_dense_inputs_equal_dense_reference() -> None:
    taus = [torch.randn(10, 12), torch.randn(10, 12)]
    got = merge("tsv", [DenseUpdate(t) for t in taus]).update.dense()
    torch.testing.assert_close(got, ref_tsv(taus, 1.0), **TOL)


def test_tsv_one_adapter_is_the_update() -> None:
    update = lora(16, 20, 4, 25)
    torch.testing.assert_close(merge("tsv", [update]).update.dense(), update.dense(), **TOL)


@pytest.mark.parametrize("method", ["knots", "tsv"])
def test_non_matrix_tensors_are_averaged(method: str) -> None:
    biases = (DenseUpdate(torch.randn(5)), DenseUpdate(torch.randn(5)))
    m = get_method(method)
    got = m.merge(MergeInputs("b", torch.randn(5), biases, (1.0, 1.0), torch.Generator()), m.resolve_params({}))
    torch.testing.assert_close(got.update.dense(), (biases[0].delta + biases[1].delta) / 2)


@pytest.mark.parametrize("method", ["knots", "tsv"])
def test_all_zero_updates_give_an_empty_update(method: str) -> None:
    zero = LowRankUpdate(up=torch.zeros(6, 2), down=torch.randn(2, 7))
    result = merge(method, [zero, zero])
    assert isinstance(result.update, LowRankUpdate) and result.update.rank == 0
    assert torch.equal(result.update.dense(), torch.zeros(6, 7))
