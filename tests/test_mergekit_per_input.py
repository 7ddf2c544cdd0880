"""Per-input method parameters (a density or gamma per model, gradients and filters of them) and
``normalize: total``, against mergekit 0.1.5's formulas written out in ``test_mergekit_conventions``:
mergekit sparsifies each model's delta with that model's own ``density`` / ``gamma`` evaluated for the
tensor, and ``normalize: true`` without a consensus divides by the sum of every model's weight.
The row-block form must give the whole-tensor bits at every block size."""

from __future__ import annotations

import pytest
import torch

from streammerge.conventions import convention_defaults
from streammerge.errors import PlanError
from streammerge.methods import DenseUpdate, MergeInputs, get_method
from streammerge.methods.rows import merge_by_blocks
from streammerge.methods.sparsify import RandomDrop
from streammerge.recipe import InputSpec, Recipe, WeightOverride, recipe_from_dict
from tests.test_mergekit_config import mk_evaluate, translate
from tests.test_mergekit_conventions import SHAPE, deltas, mk_combine, mk_magnitude, mk_outliers, small_grid

pytestmark = pytest.mark.usefixtures("one_torch_thread", "small_grid")
__all__ = ["small_grid"]


def params_of(method: str, given: dict) -> dict:
    m = get_method(method)
    declared = {p.name for p in m.params}  # all_weights is the engine's, not a declared parameter
    scalars = {k: min(v) if isinstance(v, tuple) else v for k, v in given.items() if k in declared}
    return {**m.resolve_params({**convention_defaults(method, "mergekit"), **scalars}),
            **{k: v for k, v in given.items() if isinstance(v, tuple)}}


def inputs_of(ds: list[torch.Tensor], weights: list[float], seed: int = 5) -> MergeInputs:
    return MergeInputs("model.layers.0.mlp.up_proj.weight", torch.zeros(SHAPE), tuple(DenseUpdate(d) for d in ds),
                       tuple(weights), torch.Generator().manual_seed(seed))


def whole(method: str, ds, weights, given: dict, seed: int = 5) -> torch.Tensor:
    return get_method(method).merge(inputs_of(ds, weights, seed), params_of(method, given)).update.dense()


def by_blocks(method: str, ds, weights, given: dict, rows: int, seed: int = 5) -> torch.Tensor:
    m = get_method(method)
    params = params_of(method, given)
    assert m.rows is not None and m.rows.supports(params)
    return merge_by_blocks(m.rows, inputs_of(ds, weights, seed), params, rows).view(SHAPE)


# --- methods: one value per input ---------------------------------------------------------

@pytest.mark.parametrize("method,consensus,normalize", [("ties", True, True), ("magnitude_prune", False, False)])
def test_magnitude_trims_use_each_inputs_own_density(method: str, consensus: bool, normalize: bool) -> None:
    ds, weights, densities = deltas(), [0.7, 0.2, 0.5], (0.1, 0.6, 0.0001)
    reference = mk_combine([mk_magnitude(d, k) for d, k in zip(ds, densities)], weights, consensus, normalize)
    assert torch.equal(whole(method, ds, weights, {"density": densities}), reference)
    for rows in (8, 16, 48):  # the row-block form: the same bits whatever the blocking
        assert torch.equal(by_blocks(method, ds, weights, {"density": densities}, rows), reference)
    uniform = whole(method, ds, weights, {"density": (0.3, 0.3, 0.3)})
    assert torch.equal(uniform, whole(method, ds, weights, {"density": 0.3}))


@pytest.mark.parametrize("method,consensus", [("breadcrumbs", False), ("breadcrumbs_ties", True)])
def test_breadcrumbs_bands_with_each_inputs_density_and_gamma(method: str, consensus: bool) -> None:
    ds, weights = deltas(seed=3), [0.5, 1.0, 0.25]
    densities, gammas = (0.4, 0.9, 1.0), (0.05, 0.3, 0.1)
    reference = mk_combine([mk_outliers(d, k, g) for d, k, g in zip(ds, densities, gammas)], weights, consensus,
                           normalize=False)
    assert torch.equal(whole(method, ds, weights, {"density": densities, "gamma": gammas}), reference)


def test_row_bands_with_per_input_values_are_blocking_independent() -> None:
    ds, weights = deltas(seed=4), [0.5, 1.0, 0.25]
    given = {"density": (0.4, 0.2, 0.7), "gamma": (0.05, 0.1, 0.0), "band": "row"}
    reference = whole("breadcrumbs", ds, weights, given)
    for i, d in enumerate(ds):  # input i alone: its own band
        alone = whole("breadcrumbs", [d], [weights[i]], {**given, "density": given["density"][i],
                                                         "gamma": given["gamma"][i]})
        assert int((alone != 0).sum()) == SHAPE[0] * int(given["density"][i] * SHAPE[1])
    for rows in (8, 24, 48):
        assert torch.equal(by_blocks("breadcrumbs", ds, weights, given, rows), reference)


@pytest.mark.parametrize("rescale", ["density", "none"])
def test_dare_drops_with_each_inputs_density(rescale: str) -> None:
    ds, weights, densities, seed = deltas(seed=5), [0.5, 0.8, 0.3], (0.2, 0.5, 0.9), 9
    drop = RandomDrop(densities, torch.Generator().manual_seed(seed), len(ds), rescale)
    masks = [drop.mask(torch.Size(SHAPE), i) for i in range(len(ds))]
    for m, k in zip(masks, densities):
        assert abs(float(m.mean()) - k) < 0.05
    kept = [d * w * m / (k if rescale == "density" else 1.0) for d, w, m, k in zip(ds, weights, masks, densities)]
    reference = kept[0] + kept[1] + kept[2]
    given = {"density": densities, "rescale": rescale}
    result = whole("dare_linear", ds, weights, given, seed=seed)
    torch.testing.assert_close(result, reference, rtol=1e-6, atol=1e-7)
    for rows in (8, 16):
        assert torch.equal(by_blocks("dare_linear", ds, weights, given, rows, seed=seed), result)


@pytest.mark.parametrize("method", ["task_arithmetic", "magnitude_prune"])
def test_normalize_total_divides_by_every_inputs_weight(method: str) -> None:
    """Two inputs change the tensor; a third (weight 0.6) leaves it as the base: mergekit's delta is 0 there."""
    ds, weights, idle = deltas(count=2, seed=8), [0.3, 0.9], 0.6
    sparse = ds if method == "task_arithmetic" else [mk_magnitude(d, 0.5) for d in ds]
    reference = mk_combine([*sparse, torch.zeros(SHAPE)], [*weights, idle], False, normalize=True)
    given = {"normalize": "total", "all_weights": (0.3, 0.9, idle)}
    if method == "magnitude_prune":
        given["density"] = 0.5
        assert torch.equal(by_blocks(method, ds, weights, given, 16), reference)
    assert torch.equal(whole(method, ds, weights, given), reference)
    without = whole(method, ds, weights, {**given, "normalize": "weights"})
    assert torch.equal(without, mk_combine(sparse, weights, False, normalize=True))


# --- recipes: InputSpec.params and override params -----------------------------------------

def test_params_for_takes_the_first_matching_override_per_parameter() -> None:
    spec = InputSpec("m", kind="model", weight=0.5, params={"density": [0.2, 0.8]},
                     overrides=(WeightOverride("*mlp*", weight=2.0),
                                WeightOverride("*up_proj*", params={"density": 0.9, "gamma": 0.1}),
                                WeightOverride("*mlp*", params={"density": 0.1})))
    assert spec.params_for("model.layers.2.self_attn.q_proj.weight", 2, 5) == (("density", 0.5),)
    assert spec.params_for("model.layers.2.mlp.up_proj.weight", 2, 5) == (("density", 0.9), ("gamma", 0.1))
    assert spec.params_for("model.layers.2.mlp.down_proj.weight", 2, 5) == (("density", 0.1),)
    assert spec.weight_for("model.layers.2.mlp.up_proj.weight", 2, 5) == 2.0  # a params-only entry leaves it


def test_native_recipe_reads_and_round_trips_per_input_params() -> None:
    doc = {"base": "b", "method": "ties", "inputs": [
        {"path": "a", "params": {"density": [0.2, 0.6]}},
        {"path": "c", "overrides": [{"match": "*mlp*", "params": {"density": 0.4}}]}]}
    recipe = recipe_from_dict(doc)
    assert recipe.inputs[0].params == (("density", (0.2, 0.6)),) and recipe.validate() == []
    assert recipe_from_dict(recipe.to_dict()) == recipe


@pytest.mark.parametrize("inputs,expected", [
    ([{"path": "a", "params": {"gamma": 0.1}}], "inputs[0] ('a').params.gamma: method 'ties' takes no per-input "
                                                "parameter 'gamma'; its per-input parameters: density"),
    ([{"path": "a", "params": {"density": [0.2, 1.5]}}], "inputs[0] ('a').params.density: method 'ties': "
                                                         "parameter 'density' must be <= 1.0"),
    ([{"path": "a", "overrides": [{"match": "*"}]}], "inputs[0] ('a').overrides[0]: sets neither a weight nor params"),
    ([{"path": "a", "params": {"density": []}}], "inputs[0] ('a').params.density: an empty list"),
])
def test_per_input_param_problems_name_the_field(inputs: list, expected: str) -> None:
    problems = recipe_from_dict({"base": "b", "method": "ties", "inputs": inputs}).validate()
    assert any(p.startswith(expected) for p in problems), problems


def test_per_input_params_refused_for_methods_without_them_and_for_scope_global() -> None:
    ta = Recipe(base="b", inputs=(InputSpec("a", params={"density": 0.5}),), method="task_arithmetic")
    assert any("takes no per-input parameter 'density'" in p for p in ta.validate())
    scoped = Recipe(base="b", inputs=(InputSpec("a", params={"density": 0.5}),), method="ties",
                    params=(("scope", "global"),))
    assert any("per-input parameters need scope 'tensor'" in p for p in scoped.validate())


# --- mergekit configs → per-input params ---------------------------------------------------

def gta(method: str, models: list, **extra) -> dict:
    return {"merge_method": method, "base_model": "b", "models": models, **extra}


def test_different_densities_become_per_input_params() -> None:
    r = translate(gta("ties", [{"model": "m", "parameters": {"weight": 1, "density": 0.2}},
                               {"model": "n", "parameters": {"weight": 1, "density": 0.5}}])).recipe
    assert [s.params for s in r.inputs] == [(("density", 0.2),), (("density", 0.5),)]
    assert dict(r.params)["density"] == 1.0 and r.validate() == []


def test_one_density_for_every_model_stays_the_methods_parameter() -> None:
    r = translate(gta("ties", [{"model": "m", "parameters": {"weight": 1}}, {"model": "n", "parameters": {"weight": 2}}],
                      parameters={"density": 0.3})).recipe
    assert dict(r.params)["density"] == 0.3 and all(s.params == () and s.overrides == () for s in r.inputs)


@pytest.mark.parametrize("num_layers", [2, 7])
def test_density_and_gamma_gradients_and_filters_evaluate_like_mergekit(num_layers: int) -> None:
    own_density = [{"filter": "mlp", "value": [0.1, 0.9]}, {"filter": "self_attn", "value": 0.3}]
    global_density = [{"filter": "norm", "value": 0.8}, {"value": [0.5, 0.2, 0.4]}]
    gamma = [0.0, 0.1]
    doc = gta("breadcrumbs", [{"model": "m", "parameters": {"weight": 1, "density": own_density}},
                              {"model": "n", "parameters": {"weight": 1, "gamma": 0.02}}],
              parameters={"density": global_density, "gamma": gamma})
    r = translate(doc).recipe
    assert r.validate() == []
    names = ["model.layers.{}.mlp.up_proj.weight", "model.layers.{}.self_attn.o_proj.weight",
             "model.layers.{}.input_layernorm.weight", "model.embed_tokens.weight", "model.norm.weight"]
    settings = [({"density": own_density, "gamma": None}), ({"density": None, "gamma": 0.02})]
    for layer in range(num_layers):
        for template in names:
            name = template.format(layer)
            at = layer if "{}" in template else None
            t = layer / (num_layers - 1) if at is not None else 0.0
            for spec, own in zip(r.inputs, settings):
                expected = {}
                for key, fallback in (("density", global_density), ("gamma", gamma)):
                    value = mk_evaluate(name, own[key], t) if own[key] is not None else None
                    expected[key] = value if value is not None else mk_evaluate(name, fallback, t)
                found = dict(spec.params_for(name, at, num_layers))
                assert found == pytest.approx(expected, abs=1e-15), (name, found, expected)


def test_global_lambda_gradient_is_refused_with_the_reason() -> None:
    with pytest.raises(PlanError) as info:
        translate(gta("ties", [{"model": "m", "parameters": {"weight": 1}}], parameters={"lambda": [1, 2]}))
    assert any("streammerge has one λ per merge" in p for p in info.value.problems)
