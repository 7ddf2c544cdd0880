"""The registry and parameter validation (exact messages), plus a contract every method keeps."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from streammerge.errors import MethodParameterError
from streammerge.methods import REGISTRY, DenseUpdate, LowRankUpdate, MergeInputs, TaskUpdate, get_method

ALL = sorted(REGISTRY)
LOW_RANK = {"task_arithmetic", "linear", "do_merging", "knots", "tsv"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_registry_lists_every_method_of_the_spec() -> None:
    assert set(REGISTRY) == {"task_arithmetic", "linear", "do_merging", "ties", "dare_linear", "dare_ties",
                             "breadcrumbs", "breadcrumbs_ties", "magnitude_prune", "knots", "tsv", "iso_c", "iso_cts"}
    assert all(m.name == key for key, m in REGISTRY.items())


@pytest.mark.parametrize(("method", "defaults"), [
    ("do_merging", {"orthogonalize": True, "decouple": True, "norm_axis": "row", "direction_reduce": "sum",
                    "steps": 200, "lr": 3e-2, "mu": 0.01, "max_delta": 1.0, "on_max_delta": "clip",
                    "cross_loss": "unsquared",
                    "eps": 1e-6, "lambda": 1.0, "svd_rank": 64}),
    ("task_arithmetic", {"lambda": 1.0}),
    ("linear", {}),
    ("ties", {"density": 0.2, "lambda": 1.0, "scope": "tensor", "orthogonalize": False, "decouple": False}),
    ("dare_linear", {"density": 0.1, "lambda": 1.0}),
    ("dare_ties", {"density": 0.1, "lambda": 1.0, "orthogonalize": False, "decouple": False}),
    ("breadcrumbs", {"density": 0.1, "gamma": 0.01, "lambda": 1.0, "orthogonalize": False, "decouple": False}),
    ("breadcrumbs_ties", {"density": 0.1, "gamma": 0.01, "lambda": 1.0, "orthogonalize": False, "decouple": False}),
    ("magnitude_prune", {"density": 0.2, "lambda": 1.0}),
    ("knots", {"variant": "ties", "density": 1.0, "lambda": 0.5}),
    ("tsv", {"alpha": 1.0}),
])
def test_spec_defaults(method: str, defaults: dict[str, object]) -> None:
    resolved = get_method(method).resolve_params({})
    assert {k: resolved[k] for k in defaults} == defaults


def test_flags() -> None:
    dense = {name for name, m in REGISTRY.items() if m.dense_inputs}
    assert dense == {"ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties", "magnitude_prune"}
    random = {name for name, m in REGISTRY.items() if m.uses_random}
    assert random == {"dare_linear", "dare_ties", "knots"}


def test_unknown_method() -> None:
    with pytest.raises(MethodParameterError) as info:
        get_method("do_merge")
    assert str(info.value) == f"unknown merge method 'do_merge'; available: {', '.join(ALL)}"


def test_unknown_parameter_lists_the_known_ones() -> None:
    with pytest.raises(MethodParameterError) as info:
        get_method("tsv").resolve_params({"alpha": 1.0, "rank": 3})
    assert str(info.value) == "method 'tsv' has no parameter(s) 'rank'; it takes: alpha"


@pytest.mark.parametrize(("method", "params", "message"), [
    ("do_merging", {"norm_axis": "diag"},
     "method 'do_merging': parameter 'norm_axis' must be one of ['row', 'col', 'matrix'], got 'diag'"),
    ("do_merging", {"direction_reduce": "max"},
     "method 'do_merging': parameter 'direction_reduce' must be one of ['sum', 'mean'], got 'max'"),
    ("do_merging", {"on_max_delta": "ignore"},
     "method 'do_merging': parameter 'on_max_delta' must be one of ['warn_skip', 'clip', 'error'], got 'ignore'"),
    ("do_merging", {"orthogonalize": "maybe"}, "method 'do_merging': parameter 'orthogonalize' must be a bool, got 'maybe'"),
    ("do_merging", {"steps": -1}, "method 'do_merging': parameter 'steps' must be >= 0, got -1"),
    ("do_merging", {"svd_rank": 0}, "method 'do_merging': parameter 'svd_rank' must be >= 1, got 0"),
    ("ties", {"density": 1.5}, "method 'ties': parameter 'density' must be <= 1.0, got 1.5"),
    ("ties", {"scope": "layer"}, "method 'ties': parameter 'scope' must be one of ['tensor', 'global'], got 'layer'"),
    ("dare_linear", {"density": 0}, "method 'dare_linear': parameter 'density' must be > 0 "
                                    "(kept entries are rescaled by 1/density), got 0.0"),
    ("breadcrumbs", {"density": 0.5, "gamma": 0.6}, "method 'breadcrumbs': gamma + density must be <= 1 "
                                                    "(a row cannot drop 0.6 and keep 0.5 of its entries), got 1.1"),
    ("knots", {"variant": "dare_ties", "density": "0"}, "method 'knots': parameter 'density' must be > 0 with "
                                                        "variant 'dare_ties' (kept entries are rescaled by 1/density), "
                                                        "got 0.0"),
    ("knots", {"variant": "dare"}, "method 'knots': parameter 'variant' must be one of "
                                   "['ties', 'dare_ties', 'linear'], got 'dare'"),
])
def test_bad_values_are_reported_exactly(method: str, params: dict[str, object], message: str) -> None:
    with pytest.raises(MethodParameterError) as info:
        get_method(method).resolve_params(params)
    assert str(info.value) == message


def test_cli_strings_are_parsed() -> None:
    resolved = get_method("do_merging").resolve_params({"orthogonalize": "off", "steps": "50", "lambda": "0.5"})
    assert (resolved["orthogonalize"], resolved["steps"], resolved["lambda"]) == (False, 50, 0.5)


# ---- the contract every method keeps -----------------------------------------------------------------

def _lora(r: int, seed: int, d_out: int = 12, d_in: int = 20) -> LowRankUpdate:
    g = torch.Generator().manual_seed(seed)
    return LowRankUpdate(up=torch.randn(d_out, r, generator=g) * (8 / r), down=torch.randn(r, d_in, generator=g))


CASES: dict[str, Callable[[], tuple[torch.Tensor, tuple[TaskUpdate, ...]]]] = {
    "loras_of_different_ranks": lambda: (torch.randn(12, 20), (_lora(2, 1), _lora(8, 2), _lora(4, 3))),
    "one_lora": lambda: (torch.randn(12, 20), (_lora(4, 4),)),
    "full_fine_tunes": lambda: (torch.randn(12, 20), (DenseUpdate(torch.randn(12, 20)), DenseUpdate(torch.randn(12, 20)))),
    "mixed": lambda: (torch.randn(12, 20), (_lora(3, 5), DenseUpdate(torch.randn(12, 20)))),
    "transposed_full_fine_tune": lambda: (torch.randn(12, 20), (DenseUpdate(torch.randn(20, 12).T), _lora(2, 6))),
    "biases": lambda: (torch.randn(12), (DenseUpdate(torch.randn(12)), DenseUpdate(torch.randn(12)))),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("method", ALL)
def test_every_method_on_every_input_kind(method: str, case: str) -> None:
    m = get_method(method)
    base, updates = CASES[case]()
    originals = [u.dense().clone() for u in updates]
    params = m.resolve_params({"steps": 10} if "steps" in {p.name for p in m.params} else {})

    def run(base: torch.Tensor = base) -> tuple[torch.Tensor, dict[str, float], TaskUpdate]:
        inputs = MergeInputs("w", base, updates, (1.0,) * len(updates), torch.Generator().manual_seed(7))
        result = m.merge(inputs, params)
        return result.update.dense(), result.stats, result.update

    first, stats, update = run()
    assert first.shape == base.shape and first.dtype == torch.float32
    assert torch.isfinite(first).all()
    assert all(isinstance(v, float) for v in stats.values())
    assert torch.equal(first, run()[0])  # same seed, same bytes
    for u, original in zip(updates, originals):
        assert torch.equal(u.dense(), original)  # inputs are never modified in place
    if not m.reads_base:  # the engine may pass a zero-stride placeholder: values must not matter
        assert torch.equal(first, run(torch.zeros(()).expand(base.shape))[0])
    if method in LOW_RANK and case in ("loras_of_different_ranks", "one_lora"):
        assert isinstance(update, LowRankUpdate)
