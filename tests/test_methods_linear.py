"""Task Arithmetic and the linear average: exact low-rank paths against W0 + s·B@A oracles."""

from __future__ import annotations


import pytest
import torch

from streammerge.errors import MethodParameterError
from streammerge.methods import DenseUpdate, LowRankUpdate, MergeInputs, TaskUpdate, apply_update, get_method

TOL = {"rtol": 1e-5, "atol": 1e-5}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def peft_lora(d_out: int, d_in: int, r: int, alpha: float, seed: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A, B, s) as PEFT stores them: A [r, d_in], B [d_out, r], s = α / r."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(r, d_in, generator=g), torch.randn(d_out, r, generator=g), alpha / r


def merged(method: str, base: torch.Tensor, updates: tuple[TaskUpdate, ...], weights: tuple[float, ...],
           **params: object) -> tuple[torch.Tensor, TaskUpdate]:
    m = get_method(method)
    result = m.merge(MergeInputs("w", base, updates, weights, torch.Generator()), m.resolve_params(params))
    return apply_update(base, result.update), result.update


def test_task_arithmetic_one_adapter_is_base_plus_delta() -> None:
    base = torch.randn(16, 24)
    a, b, s = peft_lora(16, 24, 4, 8.0, 0)
    out, update = merged("task_arithmetic", base, (LowRankUpdate(up=b * s, down=a),), (1.0,))
    torch.testing.assert_close(out, base + s * (b @ a), **TOL)
    assert isinstance(update, LowRankUpdate) and update.rank == 4


def test_task_arithmetic_different_ranks_alphas_weights() -> None:
    base = torch.randn(16, 24)
    loras = [peft_lora(16, 24, 4, 8.0, 1), peft_lora(16, 24, 8, 16.0, 2), peft_lora(16, 24, 2, 1.0, 3)]
    weights = (1.0, 0.5, -1.0)
    updates = tuple(LowRankUpdate(up=b * s, down=a) for a, b, s in loras)
    out, update = merged("task_arithmetic", base, updates, weights, **{"lambda": 0.8})
    expected = base + 0.8 * sum(w * s * (b @ a) for (a, b, s), w in zip(loras, weights))
    torch.testing.assert_close(out, expected, **TOL)
    assert isinstance(update, LowRankUpdate) and update.rank == 14  # concatenated, never densified


def test_linear_is_the_weighted_average_of_fine_tuned_weights() -> None:
    base = torch.randn(10, 12)
    a, b, s = peft_lora(10, 12, 3, 6.0, 4)
    tau = torch.randn(10, 12)
    updates: tuple[TaskUpdate, ...] = (LowRankUpdate(up=b * s, down=a), DenseUpdate(tau))
    out, _ = merged("linear", base, updates, (3.0, 1.0))
    fine_tuned = [base + s * (b @ a), base + tau]
    torch.testing.assert_close(out, (3.0 * fine_tuned[0] + 1.0 * fine_tuned[1]) / 4.0, **TOL)


def test_linear_low_rank_inputs_stay_low_rank() -> None:
    loras = [peft_lora(10, 12, 3, 6.0, 5), peft_lora(10, 12, 5, 5.0, 6)]
    updates = tuple(LowRankUpdate(up=b * s, down=a) for a, b, s in loras)
    _, update = merged("linear", torch.zeros(10, 12), updates, (1.0, 1.0))
    assert isinstance(update, LowRankUpdate) and update.rank == 8
    torch.testing.assert_close(update.dense(), (updates[0].dense() + updates[1].dense()) / 2, **TOL)


def test_linear_rejects_weights_that_sum_to_zero() -> None:
    updates = (DenseUpdate(torch.ones(3)), DenseUpdate(torch.ones(3)))
    with pytest.raises(MethodParameterError) as info:
        merged("linear", torch.zeros(3), updates, (1.0, -1.0))
    assert str(info.value) == (
        "method 'linear': the input weights [1.0, -1.0] sum to 0, so the weighted average for tensor 'w' "
        "is undefined; give weights with a non-zero sum")
