"""mergekit configs → recipes: every field, gradients, filters, and errors with their field path.

The references for gradients and filters are mergekit 0.1.5's rules written out here
(``config.evaluate_setting``, ``plan.plan_slice``): layer ``l`` of ``L`` has ``t = l / (L − 1)``
(embeddings, final norm, lm_head ``t = 0``); a gradient of ``n`` values takes
``(1 − f)·v[i] + f·v[i + 1]`` at ``i = int(t·(n − 1))``; the first ``{filter, value}`` whose filter
is a substring of the tensor name (or is absent / ``*``) applies; a model's own setting wins over
the global one.
"""

from __future__ import annotations

import pytest

from streammerge.errors import PlanError
from streammerge.mergekit_config import is_mergekit_document, translate_mergekit
from streammerge.recipe import InputSpec, interpolate, recipe_from_dict


def translate(doc: dict):
    return translate_mergekit(doc, source="mk.yml")


def problems(doc: dict) -> list[str]:
    with pytest.raises(PlanError) as info:
        translate(doc)
    return info.value.problems


def ties(**extra) -> dict:
    doc = {"merge_method": "ties", "base_model": "org/base",
           "models": [{"model": "org/base"},
                      {"model": "org/ft1", "parameters": {"weight": 0.6, "density": 0.5}},
                      {"model": "./ft2@v2", "parameters": {"weight": 0.4, "density": 0.5}}]}
    doc.update(extra)
    return doc


def mk_evaluate(name: str, setting, t: float):
    """mergekit's evaluate_setting for numbers (None when no entry applies)."""
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, (int, float)):
        return float(setting)
    if all(isinstance(e, (int, float)) for e in setting):
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * setting[i0] + frac * setting[i1]
    for cond in setting:
        if cond.get("filter") in (None, "*") or cond["filter"] in name:
            return mk_evaluate(name, cond["value"], t)
    return None


def test_detection() -> None:
    assert is_mergekit_document(ties()) and not is_mergekit_document({"base": "b", "inputs": ["a"]})


def test_every_top_level_field() -> None:
    doc = ties(parameters={"normalize": True, "int8_mask": True, "lambda": 0.9, "rescale": False},
               dtype="bfloat16", out_dtype="float16", tokenizer_source="base")
    result = translate(doc)
    r = result.recipe
    assert (r.base, r.revision, r.method, r.conventions, r.dtype) == ("org/base", None, "ties", "mergekit", "float16")
    assert r.inputs == (InputSpec("org/ft1", kind="model", weight=0.6),
                        InputSpec("./ft2", kind="model", weight=0.4, revision="v2"))
    assert dict(r.params) == {"density": 0.5, "lambda": 0.9, "normalize": "weights", "rescale": "none",
                              "min_keep": 1, "compute_dtype": "bfloat16"}
    assert any("int8_mask" in n for n in result.notes) and any("bfloat16" in n for n in result.notes)
    assert r.validate() == []


def test_tokenizer_mapping_with_base_source_is_accepted() -> None:
    assert translate(ties(tokenizer={"source": "base"})).recipe.method == "ties"


@pytest.mark.parametrize("method,expected", [
    ("ties", {"density": 1.0, "lambda": 1.0, "normalize": "weights", "rescale": "none", "min_keep": 1}),
    ("dare_ties", {"density": 1.0, "lambda": 1.0, "normalize": "none", "rescale": "l1"}),
    ("dare_linear", {"density": 1.0, "lambda": 1.0, "normalize": "none", "rescale": "l1"}),
    ("breadcrumbs", {"density": 1.0, "gamma": 0.01, "lambda": 1.0, "normalize": "none", "rescale": "none",
                     "band": "tensor"}),
    ("breadcrumbs_ties", {"density": 1.0, "gamma": 0.01, "lambda": 1.0, "normalize": "none", "rescale": "none",
                          "band": "tensor"}),
    ("task_arithmetic", {"lambda": 1.0, "normalize": "none"}),
])
def test_mergekit_defaults_per_method(method: str, expected: dict) -> None:
    doc = {"merge_method": method, "base_model": "b", "models": [{"model": "m", "parameters": {"weight": 1}}]}
    assert dict(translate(doc).recipe.params) == expected


def test_normalize_true_folds_the_sum_of_all_weights() -> None:
    doc = {"merge_method": "dare_linear", "base_model": "b", "parameters": {"normalize": "true"},
           "models": [{"model": "m1", "parameters": {"weight": 1, "density": 0.3}},
                      {"model": "m2", "parameters": {"weight": 3, "density": 0.3}}]}
    r = translate(doc).recipe
    assert dict(r.params)["normalize"] == "none" and [s.weight for s in r.inputs] == [0.25, 0.75]


def test_normalize_true_with_gradients_on_full_models_divides_per_tensor() -> None:
    doc = {"merge_method": "task_arithmetic", "base_model": "b", "parameters": {"normalize": True},
           "models": [{"model": "m1", "parameters": {"weight": [1, 2]}}, {"model": "m2", "parameters": {"weight": 3}}]}
    r = translate(doc).recipe
    assert dict(r.params)["normalize"] == "total" and [s.weight for s in r.inputs] == [(1.0, 2.0), 3.0]


def test_normalize_true_with_loras_folds_the_sum_of_weights() -> None:
    doc = {"merge_method": "task_arithmetic", "base_model": "b", "parameters": {"normalize": True},
           "models": [{"model": "b+l1", "parameters": {"weight": 1}}, {"model": "m2", "parameters": {"weight": 3}}]}
    r = translate(doc).recipe
    assert [(s.kind, s.path, s.weight) for s in r.inputs] == [("adapter", "l1", 0.25), ("model", "m2", 0.75)]
    assert dict(r.params)["normalize"] == "none"


def test_model_plus_lora_on_the_base_is_an_adapter_input() -> None:
    doc = ties(models=[{"model": "org/base+org/lora@abc", "parameters": {"weight": 0.5, "density": 0.5}},
                       {"model": {"model": "org/base", "lora": "./lora2"},
                        "parameters": {"weight": 1, "density": 0.5}}])
    r = translate(doc).recipe
    assert r.inputs == (InputSpec("org/lora", kind="adapter", weight=0.5, revision="abc"),
                        InputSpec("./lora2", kind="adapter", weight=1.0))


@pytest.mark.parametrize("num_layers", [2, 5, 32])
def test_gradients_interpolate_like_mergekit(num_layers: int) -> None:
    gradient = [0.1, 0.9, 0.3, 0.5]
    doc = ties(models=[{"model": "m", "parameters": {"weight": gradient, "density": 0.5}}])
    spec = translate(doc).recipe.inputs[0]
    assert spec.weight == tuple(gradient)
    for layer in range(num_layers):
        t = layer / (num_layers - 1)
        name = f"model.layers.{layer}.mlp.up_proj.weight"
        assert spec.weight_for(name, layer, num_layers) == mk_evaluate(name, gradient, t)
    assert spec.weight_for("model.embed_tokens.weight", None, num_layers) == mk_evaluate("", gradient, 0.0)
    assert interpolate((2.0,), 3, 8) == 2.0


def test_filters_take_the_first_matching_substring_then_the_global_setting() -> None:
    model_setting = [{"filter": "self_attn", "value": 0.2}, {"filter": "mlp", "value": [0.0, 1.0]},
                     {"filter": "up_proj", "value": 0.9}]  # unreachable for mlp tensors: mlp comes first
    global_setting = [{"filter": "norm", "value": 0.7}, {"value": 0.5}]
    doc = ties(models=[{"model": "m", "parameters": {"weight": model_setting, "density": 0.5}}],
               parameters={"weight": global_setting})
    spec = translate(doc).recipe.inputs[0]
    assert [o.match for o in spec.overrides] == ["*self_attn*", "*mlp*", "*up_proj*", "*norm*"]
    names = ["model.layers.3.self_attn.q_proj.weight", "model.layers.3.mlp.up_proj.weight",
             "model.layers.3.input_layernorm.weight", "model.embed_tokens.weight", "lm_head.weight",
             "model.norm.weight"]
    for name in names:
        layer = 3 if ".layers." in name else None
        t = 3 / 7 if layer is not None else 0.0
        expected = mk_evaluate(name, model_setting, t)
        if expected is None:
            expected = mk_evaluate(name, global_setting, t)
        assert spec.weight_for(name, layer, 8) == pytest.approx(expected, abs=0, rel=1e-15), name


def test_filter_text_is_matched_literally() -> None:
    doc = ties(models=[{"model": "m", "parameters": {"weight": [{"filter": "layers.1[", "value": 2},
                                                                {"filter": "*", "value": 1}], "density": 0.5}}])
    spec = translate(doc).recipe.inputs[0]
    assert spec.weight_for("a.layers.1[x", None, 1) == 2.0 and spec.weight_for("a.layers.11", None, 1) == 1.0


def test_native_round_trip_of_the_translation() -> None:
    r = translate(ties(parameters={"lambda": 0.5})).recipe
    assert recipe_from_dict(r.to_dict()) == r


# --- refusals, each with its field path ------------------------------------------------------

@pytest.mark.parametrize("doc,expected", [
    (ties(models=[{"model": "m", "parameters": {"weight": [0.1, "x", 0.3], "density": 0.5}}]),
     "mk.yml: models[0].parameters.weight[1]: expected a number, got 'x'"),
    (ties(models=[{"model": "m", "parameters": {"density": 0.5}}]),
     "mk.yml: models[0].parameters.weight: missing; mergekit requires a weight"),
    (ties(models=[{"model": "m", "layer_range": [0, 2], "parameters": {"weight": 1}}]),
     "mk.yml: models[0].layer_range: unknown field (layer slices need `slices:`"),
    ({"merge_method": "slerp", "base_model": "b", "models": [{"model": "m"}]},
     "mk.yml: merge_method: 'slerp' is not supported (spherical interpolation"),
    ({"merge_method": "della", "base_model": "b", "models": [{"model": "m"}]},
     "mk.yml: merge_method: 'della' is not supported (DELLA's"),
    ({"merge_method": "linear", "slices": [{"sources": [{"model": "m", "layer_range": [0, 2]}]}]},
     "mk.yml: slices: layer slices (layer_range, frankenmerges)"),
    (ties(base_model="org/base+org/lora"), "mk.yml: base_model: 'org/base+org/lora' puts a LoRA on the base"),
    (ties(models=[{"model": "org/other+org/lora", "parameters": {"weight": 1}}]),
     "mk.yml: models[0].model: the LoRA 'org/lora' sits on 'org/other', not on the base 'org/base'"),
    (ties(chat_template="chatml"), "mk.yml: chat_template: 'chatml' names a template bundled with mergekit"),
    (ties(chat_template="hello"), "mk.yml: chat_template: 'hello' is not a chat template"),
    (ties(chat_template=["x"]), "mk.yml: chat_template: expected 'auto' or a Jinja template text"),
    (ties(parameters={"normalize": [{"filter": "mlp", "value": True}]}),
     "mk.yml: parameters.normalize: a gradient or filter list for 'normalize' is not supported"),
    (ties(models=[{"model": "m", "parameters": {"weight": 1, "density": [0.5, "x"]}}]),
     "mk.yml: models[0].parameters.density[1]: expected a number, got 'x'"),
    (ties(tokenizer_source="union"), "mk.yml: tokenizer_source: 'union' is not supported"),
    (ties(tokenizer={"source": "base", "tokens": {"<x>": {"source": "m"}}}), "mk.yml: tokenizer.tokens"),
    (ties(parameters={"lambda": [0.5, 1.0]}), "mk.yml: parameters.lambda: a gradient or filter list"),
    (ties(parameters={"normalize": "maybe"}), "mk.yml: parameters.normalize: expected true or false, got 'maybe'"),
    ({"merge_method": "ties", "models": [{"model": "m", "parameters": {"weight": 1}}]},
     "mk.yml: base_model: missing; ties takes task vectors against a base model"),
    ({"merge_method": "linear", "parameters": {"normalize": False},
      "models": [{"model": "m", "parameters": {"weight": 1}}]}, "mk.yml: parameters.normalize: linear with"),
    (ties(models=[{"model": "m", "parameters": {"weight": [{"filter": "mlp"}], "density": 0.5}}]),
     "mk.yml: models[0].parameters.weight[0]: a conditional parameter is {filter: SUBSTRING, value: V}"),
])
def test_refusals_name_the_field(doc: dict, expected: str) -> None:
    found = problems(doc)
    assert any(p.startswith(expected) for p in found), found


def test_every_problem_is_reported_at_once() -> None:
    doc = ties(models=[{"model": "a+b", "parameters": {"weight": "x"}}], chat_template="chatml")
    found = problems(doc)
    assert len(found) >= 2


def test_unknown_fields_are_noted_not_refused() -> None:
    result = translate(ties(name="my-merge", parameters={"epsilon": 0.1}))
    assert any(n.startswith("name:") for n in result.notes)
    assert any("epsilon" in n for n in result.notes)


def test_linear_is_task_arithmetic_against_the_first_model_with_averaged_weights() -> None:
    doc = {"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": 1}},
                                                {"model": "b", "parameters": {"weight": 3}}]}
    r = translate(doc).recipe
    assert (r.base, r.method, dict(r.params)["normalize"]) == ("a", "task_arithmetic", "none")
    assert [(s.path, s.kind, s.weight) for s in r.inputs] == [("b", "model", 0.75)]


def test_linear_with_gradient_weights_divides_each_tensor_by_every_models_weight() -> None:
    doc = {"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": 1}},
                                                {"model": "b", "parameters": {"weight": [0, 2]}}]}
    r = translate(doc).recipe
    assert (r.base, r.method, dict(r.params)["normalize"]) == ("a", "task_arithmetic", "total")
    assert [(s.path, s.kind, s.weight) for s in r.inputs] == [("a", "model", 1.0), ("b", "model", (0.0, 2.0))]


def test_linear_of_loras_becomes_task_arithmetic_with_averaged_weights() -> None:
    doc = {"merge_method": "linear", "models": [{"model": "x+l1", "parameters": {"weight": 1}},
                                                {"model": "x+l2", "parameters": {"weight": 2}},
                                                {"model": "x", "parameters": {"weight": 1}}]}
    r = translate(doc).recipe
    assert (r.base, r.method) == ("x", "task_arithmetic")
    assert [(s.path, s.kind, s.weight) for s in r.inputs] == [("l1", "adapter", 0.25), ("l2", "adapter", 0.5)]
