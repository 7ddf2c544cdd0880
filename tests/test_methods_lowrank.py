"""The shared low-rank helpers against dense torch.linalg oracles."""

from __future__ import annotations


import pytest
import torch

from streammerge.methods import DenseUpdate, LowRankUpdate
from streammerge.methods.lowrank import (
    col_norms,
    concat_svd,
    dense_factors,
    frobenius_norm,
    polar,
    product_svd,
    row_norms,
    update_svd,
)
from tests.helpers import random_lora as lora

TOL = {"rtol": 1e-4, "atol": 1e-5}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("update", [lora(12, 20, 4, 0), DenseUpdate(torch.randn(12, 20))])
def test_norms_equal_dense_norms(update: LowRankUpdate | DenseUpdate) -> None:
    dense = update.dense()
    torch.testing.assert_close(row_norms(update), dense.norm(dim=1), **TOL)
    torch.testing.assert_close(col_norms(update), dense.norm(dim=0), **TOL)
    torch.testing.assert_close(frobenius_norm(update), dense.norm(), **TOL)


def test_row_norm_of_zero_row_is_zero_not_nan() -> None:
    update = lora(6, 9, 3, 1)
    update.up[2] = 0
    norms = row_norms(update)
    assert norms[2] == 0 and torch.isfinite(norms).all()


def test_product_svd_reconstructs_and_is_orthonormal() -> None:
    update = lora(30, 40, 5, 2)
    u, s, vh = product_svd(update.up, update.down)
    assert u.shape == (30, 5) and s.shape == (5,) and vh.shape == (5, 40)
    torch.testing.assert_close(u @ torch.diag(s) @ vh, update.dense(), **TOL)
    torch.testing.assert_close(u.T @ u, torch.eye(5), **TOL)
    torch.testing.assert_close(vh @ vh.T, torch.eye(5), **TOL)
    torch.testing.assert_close(s, torch.linalg.svdvals(update.dense())[:5], **TOL)


def test_product_svd_truncates_at_true_rank() -> None:
    update = lora(30, 40, 6, 3)
    update.up[:, 4:] = update.up[:, :2]  # columns 4, 5 repeat 0, 1 → rank 4 (a rank-6 LoRA of rank 4)
    _, s, _ = update_svd(update)
    assert s.numel() == 4


def test_concat_svd_matches_dense_svd_of_concatenation() -> None:
    updates = [lora(16, 10, 3, 4), lora(16, 10, 2, 5)]
    u, s, vh = concat_svd(updates)
    stacked = torch.cat([x.dense() for x in updates], dim=1)
    torch.testing.assert_close(s, torch.linalg.svdvals(stacked)[:5], **TOL)
    torch.testing.assert_close(u @ torch.diag(s) @ vh, stacked, **TOL)
    mixed = concat_svd([updates[0], DenseUpdate(updates[1].dense())])
    torch.testing.assert_close(mixed[1], s, **TOL)


def test_polar_factor_is_orthonormal_and_closest() -> None:
    m = torch.randn(20, 6)
    p = polar(m)
    torch.testing.assert_close(p.T @ p, torch.eye(6), **TOL)
    # The polar factor is the orthonormal-column matrix closest to m in Frobenius norm.
    q, _ = torch.linalg.qr(m)
    assert (p - m).norm() <= (q - m).norm() + 1e-6
    # P = M (MᵀM)^(-1/2)
    evals, evecs = torch.linalg.eigh(m.T @ m)
    torch.testing.assert_close(p, m @ evecs @ torch.diag(evals.rsqrt()) @ evecs.T, **TOL)


def test_dense_factors_are_the_best_rank_k_approximation() -> None:
    delta = torch.randn(15, 25)
    f = dense_factors(delta, 4)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    torch.testing.assert_close(f.dense(), u[:, :4] @ torch.diag(s[:4]) @ vh[:4], **TOL)
    # balanced split: both factors carry √σ
    torch.testing.assert_close(f.up.norm(dim=0), s[:4].sqrt(), **TOL)
    torch.testing.assert_close(f.down.norm(dim=1), s[:4].sqrt(), **TOL)
    assert dense_factors(delta, 100).rank == 15
