"""``lambda: auto`` / ``alpha: auto``: the merged update gets the mean task-update norm, per tensor."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from streammerge.errors import MethodParameterError
from streammerge.methods import DenseUpdate, LowRankUpdate, MergeInputs, MergeResult, TaskUpdate, get_method
from tests.helpers import read_model, run_cli

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SCALES = {"task_arithmetic": "lambda", "ties": "lambda", "tsv": "alpha", "iso_c": "alpha", "iso_cts": "alpha"}


def merge(method: str, updates: Sequence[TaskUpdate], weights: Sequence[float] | None = None,
          **params: object) -> MergeResult:
    m = get_method(method)
    shape = updates[0].dense().shape
    inputs = MergeInputs("w", torch.zeros(shape, dtype=torch.float64), tuple(updates),
                         tuple(weights or [1.0] * len(updates)), torch.Generator().manual_seed(0))
    return m.merge(inputs, m.resolve_params(params))


def loras(ranks: Sequence[int], seed: int = 0, d_out: int = 40, d_in: int = 32) -> list[LowRankUpdate]:
    g = torch.Generator().manual_seed(seed)
    return [LowRankUpdate(up=torch.randn(d_out, r, generator=g, dtype=torch.float64) * (1 + i),
                          down=torch.randn(r, d_in, generator=g, dtype=torch.float64)) for i, r in enumerate(ranks)]


@pytest.mark.parametrize("method", sorted(SCALES))
def test_auto_gives_the_merged_update_the_mean_task_norm(method: str) -> None:
    ups = loras((4, 4, 6))
    weights = [1.0, 0.5, 2.0]
    result = merge(method, ups, weights, **{SCALES[method]: "auto"})
    target = sum(float(torch.linalg.matrix_norm(w * u.dense())) for u, w in zip(ups, weights)) / 3
    assert float(torch.linalg.matrix_norm(result.update.dense())) == pytest.approx(target, rel=1e-9)
    unit = merge(method, ups, weights, **{SCALES[method]: 1.0}).update.dense()
    torch.testing.assert_close(result.update.dense(), result.stats["lambda_auto"] * unit, rtol=1e-9, atol=1e-12)


def test_task_arithmetic_auto_is_one_over_root_t_for_orthogonal_updates_and_the_mean_for_equal_ones() -> None:
    q_out, _ = torch.linalg.qr(torch.randn(40, 12, dtype=torch.float64))
    q_in, _ = torch.linalg.qr(torch.randn(32, 12, dtype=torch.float64))
    ortho = [LowRankUpdate(up=q_out[:, 3 * i:3 * i + 3], down=q_in[:, 3 * i:3 * i + 3].T) for i in range(4)]
    assert merge("task_arithmetic", ortho, **{"lambda": "auto"}).stats["lambda_auto"] == pytest.approx(0.5)
    same = loras((3,)) * 4
    result = merge("task_arithmetic", same, **{"lambda": "auto"})
    assert result.stats["lambda_auto"] == pytest.approx(0.25)
    torch.testing.assert_close(result.update.dense(), same[0].dense(), rtol=1e-10, atol=1e-12)


def test_numeric_scale_records_no_auto_statistic() -> None:
    assert "lambda_auto" not in merge("tsv", loras((2, 2)), alpha=0.5).stats


@pytest.mark.parametrize("text", ["auto", " AUTO "])
def test_auto_parses_and_other_words_are_refused(text: str) -> None:
    assert get_method("iso_c").resolve_params({"alpha": text})["alpha"] == "auto"
    with pytest.raises(MethodParameterError, match="must be a float"):
        get_method("iso_c").resolve_params({"alpha": "automatic"})
    with pytest.raises(MethodParameterError, match="must be a float"):
        get_method("dare_linear").resolve_params({"lambda": text})  # only the documented methods take auto


def test_task_arithmetic_auto_refuses_dense_inputs() -> None:
    with pytest.raises(MethodParameterError, match="lambda=auto needs LoRA"):
        merge("task_arithmetic", [DenseUpdate(torch.ones(4, 3, dtype=torch.float64))] * 2, **{"lambda": "auto"})


def test_auto_through_the_cli_is_in_the_summary_and_the_model_card(tmp_path: Path) -> None:
    from tools.synthetic import PRESETS, write_adapter, write_model

    base = write_model(tmp_path / "base", PRESETS["tiny"], "F32", seed=0)
    adapters = [write_adapter(base, tmp_path / f"a{i}", rank=4, seed=i + 1, b_std=0.05) for i in range(2)]
    out = tmp_path / "merged"
    proc = run_cli("merge", "--base", str(base), "--adapter", str(adapters[0]), "--adapter", str(adapters[1]),
                   "--param", "lambda=auto", "--dtype", "float32", "--out", str(out), "--no-progress")
    stats = json.loads(proc.stdout)["method_stats"]
    assert "lambda_auto" in json.dumps(stats)
    assert "lambda: auto" in (out / "README.md").read_text() and "lambda_auto" in (out / "README.md").read_text()
    merged, original = read_model(out), read_model(base)
    changed = [n for n in merged if not torch.equal(merged[n], original[n])]
    assert changed and all(n.endswith("_proj.weight") for n in changed)
