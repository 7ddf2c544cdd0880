"""Iso-C and Iso-CTS: FusionBench's formulas as the dense reference, low-rank route == dense route,
and a merge through the CLI against the reference computed from the adapter files."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from streammerge.methods import DenseUpdate, LowRankUpdate, MergeInputs, MergeResult, TaskUpdate, get_method
from streammerge.methods.iso_cts import subspace_sizes
from tests.helpers import adapter_config, load_adapter_file, read_model, run_cli

pytestmark = pytest.mark.usefixtures("one_torch_thread")
F64 = {"rtol": 1e-10, "atol": 1e-10}


def merge(method: str, updates: Sequence[TaskUpdate], weights: Sequence[float] | None = None,
          **params: object) -> MergeResult:
    m = get_method(method)
    shape = updates[0].dense().shape
    dtype = updates[0].dense().dtype
    inputs = MergeInputs("w", torch.zeros(shape, dtype=dtype), tuple(updates),
                         tuple(weights or [1.0] * len(updates)), torch.Generator().manual_seed(0))
    return m.merge(inputs, m.resolve_params(params))


# ---- FusionBench fusion_bench/method/isotropic_merging/iso_utils.py, one 2-D key, comments ours

def fusionbench_iso_c(tvs: Sequence[torch.Tensor], scaling_factor: float) -> torch.Tensor:
    new = sum(tvs) / len(tvs) * len(tvs)
    u, s, v = torch.linalg.svd(new, full_matrices=False)
    return scaling_factor * torch.linalg.multi_dot((u, torch.diag(torch.ones_like(s) * s.mean()), v))


def fusionbench_iso_cts(tvs: Sequence[torch.Tensor], fraction: float, scaling_factor: float,
                        dims: int | None = None) -> torch.Tensor:
    """``dims`` replaces ``min(shape)`` (the span a LoRA sum can fill); None = the reference as written."""
    shape = tvs[0].shape
    full = min(shape) if dims is None else dims
    combined = sum(tvs)
    k = int(full * fraction)
    k = full - round((full - k) / len(tvs)) * len(tvs)
    u, s, v = torch.linalg.svd(combined, full_matrices=False)
    cu, cs, cv = u[:, :k], s[:k], v[:k, :]
    n = int((full - k) / len(tvs))
    us, ss, vs = [], [], []
    for w in tvs:
        u_ts, s_ts, v_ts = torch.linalg.svd(w - cu @ cu.T @ w, full_matrices=False)
        us.append(u_ts[:, :n]), ss.append(s_ts[:n]), vs.append(v_ts[:n, :])
    su, ss_all, sv = torch.cat([*us, cu], 1), torch.cat([*ss, cs]), torch.cat([*vs, cv], 0)
    a, _, b = torch.linalg.svd(su, full_matrices=False)
    c, _, d = torch.linalg.svd(sv, full_matrices=False)
    return scaling_factor * torch.linalg.multi_dot((a @ b, torch.diag(torch.ones_like(ss_all) * ss_all.mean()), c @ d))


def dense_tasks(d_out: int, d_in: int, n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(d_out, d_in, generator=g, dtype=torch.float64) * (1 + i) for i in range(n)]


def loras(d_out: int, d_in: int, ranks: Sequence[int], seed: int = 0) -> list[LowRankUpdate]:
    g = torch.Generator().manual_seed(seed)
    return [LowRankUpdate(up=torch.randn(d_out, r, generator=g, dtype=torch.float64) * (1 + i),
                          down=torch.randn(r, d_in, generator=g, dtype=torch.float64)) for i, r in enumerate(ranks)]


@pytest.mark.parametrize(("d_out", "d_in", "n", "alpha"), [(20, 32, 3, 1.0), (40, 24, 4, 1.5), (30, 30, 2, 0.7)])
def test_iso_c_equals_fusionbench_on_full_fine_tunes(d_out: int, d_in: int, n: int, alpha: float) -> None:
    tvs = dense_tasks(d_out, d_in, n)
    ours = merge("iso_c", [DenseUpdate(t) for t in tvs], alpha=alpha)
    torch.testing.assert_close(ours.update.dense(), fusionbench_iso_c(tvs, alpha), **F64)
    assert ours.stats["iso_rank"] == min(d_out, d_in)


@pytest.mark.parametrize(("d_out", "d_in", "n", "fraction"),
                         [(20, 32, 3, 0.8), (40, 24, 4, 0.8), (30, 30, 2, 0.5), (36, 36, 5, 0.9)])
def test_iso_cts_equals_fusionbench_on_full_fine_tunes(d_out: int, d_in: int, n: int, fraction: float) -> None:
    tvs = dense_tasks(d_out, d_in, n, seed=1)
    ours = merge("iso_cts", [DenseUpdate(t) for t in tvs], alpha=1.3, common_space_fraction=fraction)
    torch.testing.assert_close(ours.update.dense(), fusionbench_iso_cts(tvs, fraction, 1.3), **F64)
    assert ours.stats["iso_rank"] == min(d_out, d_in)


@pytest.mark.parametrize("ranks", [(4, 4, 4), (2, 6, 3, 5)])
def test_iso_c_on_lora_is_fusionbench_without_the_null_directions(ranks: Sequence[int]) -> None:
    ups = loras(48, 40, ranks)
    low = merge("iso_c", ups, alpha=1.2)
    dense = [u.dense() for u in ups]
    u, s, vh = torch.linalg.svd(sum(dense), full_matrices=False)
    k = sum(ranks)  # the sum's rank; the reference would also give the 40 - k null directions mean(σ)
    ref = 1.2 * (s[:k].mean()) * u[:, :k] @ vh[:k]
    assert isinstance(low.update, LowRankUpdate) and low.update.rank == k
    torch.testing.assert_close(low.update.dense(), ref, **F64)
    torch.testing.assert_close(merge("iso_c", [DenseUpdate(d) for d in dense], alpha=1.2).update.dense(),
                               ref, **F64)


@pytest.mark.parametrize(("ranks", "fraction"), [((4, 4, 4), 0.8), ((2, 6, 3, 5), 0.5), ((8, 8), 0.9)])
def test_iso_cts_low_rank_route_equals_dense_route_and_reference(ranks: Sequence[int], fraction: float) -> None:
    ups = loras(48, 40, ranks, seed=2)
    dense = [u.dense() for u in ups]
    low = merge("iso_cts", ups, alpha=0.9, common_space_fraction=fraction)
    via_dense = merge("iso_cts", [DenseUpdate(d) for d in dense], alpha=0.9, common_space_fraction=fraction)
    assert isinstance(low.update, LowRankUpdate) and low.update.rank == sum(ranks)
    torch.testing.assert_close(low.update.dense(), via_dense.update.dense(), **F64)
    # FusionBench's formulas with min(shape) replaced by the span the LoRA sum can fill (Σ r_i).
    torch.testing.assert_close(low.update.dense(), fusionbench_iso_cts(dense, fraction, 0.9, dims=sum(ranks)), **F64)


def test_iso_cts_with_whole_common_space_is_iso_c() -> None:
    ups = loras(32, 24, (3, 5))
    torch.testing.assert_close(merge("iso_cts", ups, common_space_fraction=1.0).update.dense(),
                               merge("iso_c", ups).update.dense(), **F64)


def test_user_weights_scale_the_task_updates() -> None:
    ups = loras(24, 20, (3, 3))
    scaled = [LowRankUpdate(up=ups[0].up * 2.0, down=ups[0].down), LowRankUpdate(up=-ups[1].up, down=ups[1].down)]
    for method in ("iso_c", "iso_cts"):
        torch.testing.assert_close(merge(method, ups, weights=[2.0, -1.0]).update.dense(),
                                   merge(method, scaled).update.dense(), **F64)


def test_spectrum_is_flat() -> None:
    ups = loras(40, 36, (4, 4, 4))
    for method in ("iso_c", "iso_cts"):
        s = torch.linalg.svdvals(merge(method, ups).update.dense())[:12]
        torch.testing.assert_close(s, torch.full_like(s, float(s[0])), rtol=1e-9, atol=0)


@pytest.mark.parametrize(("dims", "tasks", "fraction", "expected"),
                         [(768, 8, 0.8, (616, 19)), (96, 6, 0.8, (78, 3)), (10, 3, 0.0, (1, 3)), (5, 6, 0.5, (5, 0))])
def test_subspace_sizes_follow_the_reference_rounding(dims: int, tasks: int, fraction: float,
                                                      expected: tuple[int, int]) -> None:
    assert subspace_sizes(dims, tasks, fraction) == expected


@pytest.mark.parametrize("method", ["iso_c", "iso_cts"])
def test_zero_and_non_matrix_inputs(method: str) -> None:
    zero = LowRankUpdate(up=torch.zeros(8, 2), down=torch.zeros(2, 6))
    assert merge(method, [zero, zero]).update.dense().abs().max() == 0
    bias = [DenseUpdate(torch.ones(5)), DenseUpdate(3 * torch.ones(5))]
    torch.testing.assert_close(merge(method, bias).update.dense(), 2 * torch.ones(5))


@pytest.mark.parametrize("method", ["iso_c", "iso_cts"])
def test_merge_through_the_cli_on_a_tiny_model(tmp_path: Path, method: str) -> None:
    from tools.synthetic import PRESETS, write_adapter, write_model

    base = write_model(tmp_path / "base", PRESETS["tiny"], "F32", seed=0)
    adapters = [write_adapter(base, tmp_path / f"a{i}", rank=4, seed=i + 1, b_std=0.05) for i in range(3)]
    out = tmp_path / "merged"
    args = ["merge", "--base", str(base), *sum((["--adapter", str(a)] for a in adapters), []),
            "--method", method, "--param", "alpha=1.5", "--dtype", "float32", "--out", str(out), "--no-progress"]
    summary = json.loads(run_cli(*args).stdout)
    assert "iso_sigma_mean" in json.dumps(summary["method_stats"])
    merged, original = read_model(out), read_model(base)
    module = "model.layers.1.mlp.down_proj"
    tvs = []
    for a in adapters:
        f, cfg = load_adapter_file(a), adapter_config(a)
        scale = cfg["lora_alpha"] / cfg["r"]
        tvs.append(scale * f[f"base_model.model.{module}.lora_B.weight"].double()
                   @ f[f"base_model.model.{module}.lora_A.weight"].double())
    if method == "iso_c":  # rank-12 sum: the reference without its null directions
        u, s, vh = torch.linalg.svd(sum(tvs), full_matrices=False)
        ref = s[:12].mean() * u[:, :12] @ vh[:12]
    else:
        ref = fusionbench_iso_cts(tvs, 0.8, 1.0, dims=12)
    expected = original[f"{module}.weight"].double() + 1.5 * ref
    torch.testing.assert_close(merged[f"{module}.weight"].double(), expected, rtol=1e-5, atol=1e-6)
