"""mergekit YAML configs, translated into a ``Recipe`` that computes the same merge.

mergekit 0.1.5's schema (``config.py``): ``merge_method``, ``base_model``, ``models[].model`` with
``parameters``, global ``parameters``, ``dtype``, ``out_dtype``, ``tokenizer_source`` /
``tokenizer``, ``chat_template``.  A parameter is a scalar, a gradient (a list interpolated from
the first layer to the last, as our per-layer weights are), or a list of ``{filter, value}``
entries: the first entry whose ``filter`` is a substring of the tensor name (or is absent / ``*``)
applies; a model's own setting wins over the global one, which wins over the default.  ``weight``
becomes the input's weight and overrides, ``density`` / ``gamma`` its per-input ``params`` and
override ``params`` (one recipe-level value when every model gives the same number).

``model+lora`` references become adapter inputs whose task vector is ``s·B·A`` relative to the
base, merged by streaming (mergekit merges the LoRA into a full copy first, ``merge_and_unload``,
and takes ``(W + s·B·A) − W`` in the model's dtype).  That is the same math only when the LoRA
sits on the base model itself; anything else is refused with the field path and the reason,
as are ``slices`` / ``modules`` and methods streammerge does not have.  Every method runs with
``conventions: mergekit`` (``conventions.py``), and the translation writes every parameter out.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from .conventions import MERGEKIT, mergekit_dtype_params
from .errors import PlanError
from .mergekit_settings import ModelRef, SettingReader
from .recipe import InputSpec, Recipe, Weight, WeightOverride

__all__ = ["MergekitTranslation", "is_mergekit_document", "translate_mergekit", "SUPPORTED_METHODS"]

SUPPORTED_METHODS = ("linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs",
                     "breadcrumbs_ties")
_SPARSIFYING = {"ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties"}
_ELECTING = {"ties", "dare_ties", "breadcrumbs_ties"}
_NORMALIZE_DEFAULT = {"linear": True, "task_arithmetic": False, "ties": True, "dare_ties": False,
                      "dare_linear": False, "breadcrumbs": False, "breadcrumbs_ties": False}
_RESCALE_DEFAULT = {"dare_ties": True, "dare_linear": True}
_REFUSED_METHODS = {
    "slerp": "spherical interpolation of two full models, not a task-vector merge",
    "nuslerp": "spherical interpolation, not a task-vector merge",
    "multislerp": "spherical interpolation, not a task-vector merge",
    "karcher": "a Karcher mean on the sphere, not a task-vector merge",
    "model_stock": "needs the angle between fine-tunes per tensor (not implemented)",
    "della": "DELLA's rank-dependent random drop is not implemented",
    "della_linear": "DELLA's rank-dependent random drop is not implemented",
    "sce": "SCE's variance-based selection is not implemented",
    "passthrough": "copies layers unchanged (frankenmerges); streammerge merges every tensor of one base",
    "nearswap": "not implemented", "arcee_fusion": "not implemented", "ram": "not implemented",
    "ramplus_tl": "not implemented",
}
_TOP_FIELDS = ("merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source",
               "tokenizer", "chat_template", "slices", "modules")
_MODEL_FIELDS = ("model", "parameters")
_SHARED = ("normalize", "rescale", "int8_mask", "lambda")
_MERGEKIT_TEMPLATES = ("alpaca", "chatml", "exaone", "llama3", "mistral")
"""The chat templates mergekit 0.1.5 bundles (``mergekit/_data/chat_templates``), selectable by name there."""


def _sparsify_names(method: str) -> tuple[str, ...]:
    """The per-input parameters of ``method`` besides weight (each model may give its own, per tensor)."""
    if method.startswith("breadcrumbs"):
        return ("density", "gamma")
    return ("density",) if method in _SPARSIFYING else ()


def is_mergekit_document(doc: Any) -> bool:
    """Whether a YAML document is a mergekit config (it names a ``merge_method``)."""
    return isinstance(doc, dict) and "merge_method" in doc


@dataclass
class MergekitTranslation:
    """A translated config: the recipe, and notes on what mergekit does that needs no counterpart."""

    recipe: Recipe
    notes: list[str] = field(default_factory=list)


class _Translator(SettingReader):
    def __init__(self, doc: dict[str, Any]) -> None:
        super().__init__()
        self.doc = doc

    # --- the document ----------------------------------------------------------------------

    def translate(self) -> Recipe | None:
        doc = self.doc
        for key in doc:
            if key not in _TOP_FIELDS:
                self.notes.append(f"{key}: not a mergekit 0.1.5 field; ignored (mergekit ignores it too)")
        method = doc.get("merge_method")
        if not isinstance(method, str):
            self.problems.append(f"merge_method: expected a method name, got {method!r}")
            return None
        if method not in SUPPORTED_METHODS:
            reason = _REFUSED_METHODS.get(method, "not a mergekit 0.1.5 method")
            self.problems.append(f"merge_method: {method!r} is not supported ({reason}); streammerge runs "
                                 f"{', '.join(SUPPORTED_METHODS)}")
            return None
        for key in ("slices", "modules"):
            if doc.get(key):
                self.problems.append(f"{key}: layer slices (layer_range, frankenmerges) and per-module definitions "
                                     "are not supported: streammerge merges every tensor of one base architecture; "
                                     "use `models:`")
        models = doc.get("models")
        if not isinstance(models, list) or not models:
            if not doc.get("slices") and not doc.get("modules"):
                self.problems.append("models: expected a list of {model: ..., parameters: ...}")
            return None
        shared = self.shared_parameters(method)
        base = self.ref(doc["base_model"], "base_model") if doc.get("base_model") is not None else None
        if base is not None and base.lora:
            self.problems.append(
                f"base_model: {doc['base_model']!r} puts a LoRA on the base. mergekit merges it into a full copy "
                "that becomes the base, so every task vector is taken against W + s·B·A; streammerge's base is one "
                "checkpoint. Merge it first (`streammerge merge --base MODEL --adapter LORA --out BASE_WITH_LORA`) "
                "and name that directory as base_model")
            return None
        entries = [(i, entry) for i, entry in enumerate(models)]
        if method == "linear":
            return self.linear(entries, base, shared)
        if base is None:
            self.problems.append(f"base_model: missing; {method} takes task vectors against a base model")
            return None
        return self.task_vectors(method, entries, base, shared)

    def shared_parameters(self, method: str) -> dict[str, Any]:
        given = self.doc.get("parameters") or {}
        if not isinstance(given, dict):
            self.problems.append(f"parameters: expected a mapping of name: value, got {given!r}")
            return {}
        per_input = {"weight", *_sparsify_names(method)}
        allowed = ({"normalize"} if method == "linear" else set(_SHARED)) | per_input
        result: dict[str, Any] = {}
        for name, value in given.items():
            where = f"parameters.{name}"
            if name not in allowed:
                self.notes.append(f"{where}: {method} takes no parameter {name!r}; ignored (as mergekit does)")
                continue
            if name in per_input:
                continue  # a fallback of the per-model chains
            if isinstance(value, (list, dict)):
                reason = ("λ scales the whole merged update, and streammerge has one λ per merge" if name == "lambda"
                          else f"{name} is a switch of the whole merge")
                self.problems.append(f"{where}: a gradient or filter list for {name!r} is not supported ({reason}); "
                                     "give one value")
                continue
            result[name] = self.number(value, where) if name == "lambda" else self.flag(value, where)
        if result.get("int8_mask") is not None:
            self.notes.append("parameters.int8_mask: only the dtype of mergekit's sign mask; no effect on the result")
        return result

    def model_entry(self, i: int, entry: Any) -> tuple[ModelRef | None, dict[str, Any]]:
        where = f"models[{i}]"
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, dict) or "model" not in entry:
            self.problems.append(f"{where}: expected {{model: PATH_OR_ID, parameters: {{...}}}}, got {entry!r}")
            return None, {}
        for key in entry:
            if key not in _MODEL_FIELDS:
                reason = " (layer slices need `slices:`, which is not supported)" if key == "layer_range" else ""
                self.problems.append(f"{where}.{key}: unknown field{reason}; known fields: model, parameters")
        params = entry.get("parameters") or {}
        if not isinstance(params, dict):
            self.problems.append(f"{where}.parameters: expected a mapping of name: value, got {params!r}")
            params = {}
        return self.ref(entry["model"], f"{where}.model"), params

    def chain(self, i: int, params: dict[str, Any], name: str) -> list[tuple[Any, str]]:
        """mergekit's precedence for a per-input parameter: the model's own, then the global one."""
        globals_ = self.doc.get("parameters") or {}
        return [(params.get(name), f"models[{i}].parameters.{name}"),
                (globals_.get(name) if isinstance(globals_, dict) else None, f"parameters.{name}")]

    def input_spec(self, i: int, ref: ModelRef, base: ModelRef, params: dict[str, Any]) -> InputSpec | None:
        where = f"models[{i}]"
        weight, overrides = self.weight(self.chain(i, params, "weight"), where)
        if weight is None:
            self.problems.append(f"{where}.parameters.weight: missing; mergekit requires a weight for every model "
                                 "(per model or under the global parameters)")
            return None
        if ref.lora is None:
            return InputSpec(path=ref.path, kind="model", weight=weight, revision=ref.revision, overrides=overrides)
        if ref.model_key() != base.model_key():
            self.problems.append(
                f"{where}.model: the LoRA {ref.lora!r} sits on {ref.path!r}, not on the base {base.path!r}. mergekit "
                f"takes (that model + s·B·A) − base; streammerge applies LoRA inputs to the base only. Merge it "
                f"first (`streammerge merge --base {ref.path} --adapter {ref.lora} --out DIR`) and list DIR")
            return None
        return InputSpec(path=ref.lora, kind="adapter", weight=weight, revision=ref.lora_revision,
                         overrides=overrides)

    def task_vectors(self, method: str, entries: list[tuple[int, Any]], base: ModelRef,
                     shared: dict[str, Any]) -> Recipe | None:
        inputs: list[InputSpec] = []
        own: list[list[tuple[str, Weight | None, list[tuple[str, Weight]]]]] = []
        for i, entry in entries:
            ref, params = self.model_entry(i, entry)
            if ref is None:
                continue
            if ref.lora is None and ref.model_key() == base.model_key():
                continue  # the base itself: mergekit ignores its per-input parameters
            for name in params:
                if name not in {"weight", *_sparsify_names(method)} and name not in _SHARED:
                    self.notes.append(f"models[{i}].parameters.{name}: {method} takes no parameter {name!r}; "
                                      "ignored (as mergekit does)")
                elif name in _SHARED:
                    self.notes.append(f"models[{i}].parameters.{name}: a global parameter; mergekit ignores it per "
                                      "model, and so does streammerge")
            settings = [(name, *self.setting(self.chain(i, params, name))) for name in _sparsify_names(method)]
            spec = self.input_spec(i, ref, base, params)
            if spec is not None:
                inputs.append(spec)
                own.append(settings)
        if not inputs and not self.problems:
            self.problems.append("models: no model besides the base; nothing to merge")
        method_params = self.gta_params(method, shared)
        for name in _sparsify_names(method):
            given = [(value, entries) for settings in own for n, value, entries in settings if n == name]
            if given and all(not entries and not isinstance(value, tuple) and value == given[0][0]
                             for value, entries in given) and given[0][0] is not None:
                method_params[name] = given[0][0]  # one number for every model: the method's own parameter
                own = [[s for s in settings if s[0] != name] for settings in own]
        inputs = [replace(spec, params=tuple((n, v) for n, v, _ in settings if v is not None),
                          overrides=spec.overrides + tuple(WeightOverride(match=m, params=((n, v),))
                                                           for n, _, entries in settings for m, v in entries))
                  for spec, settings in zip(inputs, own)]
        normalize = shared.get("normalize")
        normalize = _NORMALIZE_DEFAULT[method] if normalize is None else normalize
        if normalize and method not in _ELECTING:
            if self.scalar_weights(inputs) and "compute_dtype" not in method_params:
                inputs = self.fold_divisor(method, inputs)
            else:  # weights differ per tensor: divide each tensor by every model's weight there
                method_params["normalize"] = "total"
        if self.problems:
            return None
        return self.recipe(base, inputs, method, method_params)

    def gta_params(self, method: str, shared: dict[str, Any]) -> dict[str, Any]:
        params: dict[str, Any] = {"lambda": shared.get("lambda") if shared.get("lambda") is not None else 1.0}
        normalize = shared.get("normalize")
        normalize = _NORMALIZE_DEFAULT[method] if normalize is None else normalize
        params["normalize"] = "weights" if normalize and method in _ELECTING else "none"
        if method in _SPARSIFYING:
            rescale = shared.get("rescale")
            rescale = _RESCALE_DEFAULT.get(method, False) if rescale is None else rescale
            params["rescale"] = "l1" if rescale else "none"
            for name in _sparsify_names(method):  # mergekit's defaults; a model's own value replaces them
                params[name] = 1.0 if name == "density" else 0.01
            if method == "ties":
                params["min_keep"] = 1
            if method.startswith("breadcrumbs"):
                params["band"] = "tensor"
        # each op rounded to dtype, as mergekit's (its divisor then divides after the sum: not folded)
        params.update(mergekit_dtype_params(method, self.doc.get("dtype")))
        return params

    def fold_divisor(self, method: str, inputs: list[InputSpec]) -> list[InputSpec]:
        """``normalize: true`` without sign election divides by the sum of **all** models' weights.
        With plain numbers for weights that sum is one constant, folded into the weights (weights that
        differ per tensor take ``normalize: total`` instead)."""
        total = sum(float(s.weight) for s in inputs)  # type: ignore[arg-type]
        if abs(total) < 1e-8:
            if method == "linear":
                self.problems.append("models: the weights sum to 0; mergekit's linear average divides by it")
            return inputs
        return [replace(s, weight=float(s.weight) / total) for s in inputs]  # type: ignore[arg-type]

    @staticmethod
    def scalar_weights(inputs: list[InputSpec]) -> bool:
        """Whether every weight is one number on every tensor (no gradient, no filter)."""
        return all(not isinstance(s.weight, tuple) and all(o.weight is None for o in s.overrides) for s in inputs)

    def linear(self, entries: list[tuple[int, Any]], base: ModelRef | None, shared: dict[str, Any]) -> Recipe | None:
        """mergekit's linear: ``Σ_i w_i M_i / Σ_i w_i`` over every listed model (the base included when
        named).  Our base is ``base_model`` or the first model's checkpoint; ``M_i = W0 + ΔW_i``, so the
        average is Task Arithmetic with weights ``w_i / Σ_j w_j``, copies of the base adding nothing
        but their weight to the sum (with gradient or filter weights: ``normalize: total``, the base
        kept as an input that only adds its weight)."""
        if shared.get("normalize") is False:
            self.problems.append("parameters.normalize: linear with normalize: false (Σ w_i M_i, not an average) "
                                 "is not a task-vector merge; not supported")
            return None
        refs = [(i, *self.model_entry(i, entry)) for i, entry in entries]
        if base is not None and all(r is None or r.model_key() != base.model_key() or r.lora for _, r, _ in refs):
            refs.append((len(entries), base, {}))  # mergekit adds base_model as one more input
        anchor = base or next((r for _, r, _ in refs if r is not None), None)
        if anchor is None:
            return None
        inputs = [s for i, r, p in refs if r is not None and (s := self.input_spec(i, r, anchor, p)) is not None]
        if self.problems:
            return None
        narrow = mergekit_dtype_params("linear", self.doc.get("dtype"))  # fp32 math on tensors loaded in dtype
        if not self.scalar_weights(inputs):  # per-tensor weights: divide each tensor by every model's weight there
            return self.recipe(anchor, inputs, "task_arithmetic", {"lambda": 1.0, "normalize": "total", **narrow})
        folded = self.fold_divisor("linear", inputs)
        kept = [s for s in folded if not (s.kind == "model" and (s.path.rstrip("/"), s.revision) == anchor.model_key())]
        if self.problems:
            return None
        return self.recipe(anchor, kept, "task_arithmetic", {"lambda": 1.0, "normalize": "none", **narrow})

    def recipe(self, base: ModelRef, inputs: list[InputSpec], method: str, params: dict[str, Any]) -> Recipe | None:
        doc = self.doc
        dtype = doc.get("out_dtype") or doc.get("dtype")
        if "compute_dtype" in params or "load_dtype" in params:
            how = "every op computes in it" if "compute_dtype" in params else "linear computes in fp32 in between"
            self.notes.append(
                f"dtype: {doc['dtype']}: every model tensor is rounded to {doc['dtype']} on load, a model+lora is "
                f"merged into a {doc['dtype']} copy of the base and the result rounded to {doc['dtype']}, as "
                f"mergekit does; {how}")
        elif doc.get("merge_method") == "linear":
            pass  # mergekit's linear casts to fp32 before it computes, whatever the dtype
        elif doc.get("dtype") and doc.get("out_dtype") and doc["dtype"] != "float32":
            self.notes.append(f"dtype: mergekit computes in {doc['dtype']}; streammerge computes in float32 and "
                              f"casts once to out_dtype {doc['out_dtype']}")
        elif doc.get("dtype") and doc["dtype"] != "float32":
            self.notes.append(f"dtype: mergekit computes in {doc['dtype']}; streammerge computes in float32 and "
                              f"casts once to {doc['dtype']} (results may differ from mergekit's in the last bits)")
        self.tokenizer()
        template = self.chat_template()
        if self.problems:
            return None
        return Recipe(base=base.path, revision=base.revision, inputs=tuple(inputs), method=method,
                      params=tuple(sorted(params.items())), dtype=str(dtype) if dtype else None, conventions=MERGEKIT,
                      chat_template=template)

    def chat_template(self) -> str | None:
        """mergekit's ``chat_template``: ``auto``, a Jinja text (kept); its bundled names are refused."""
        value = self.doc.get("chat_template")
        if value is None or value == "":
            return None
        if not isinstance(value, str):
            self.problems.append(f"chat_template: expected 'auto' or a Jinja template text, got {value!r}")
            return None
        if self.doc.get("tokenizer_source") is None and self.doc.get("tokenizer") is None:
            self.notes.append("chat_template: mergekit 0.1.5 writes it only with tokenizer_source or tokenizer set "
                              "(else it warns and copies the tokenizer unchanged); streammerge writes it either way")
        if value in ("auto", "base"):
            return value
        if value in _MERGEKIT_TEMPLATES:
            self.problems.append(
                f"chat_template: {value!r} names a template bundled with mergekit ({', '.join(_MERGEKIT_TEMPLATES)}); "
                "streammerge does not ship them: paste the template's Jinja text, or use 'auto' (the most common "
                "template of the input models)")
            return None
        if len(value) < 20 or "{" not in value:
            self.problems.append(f"chat_template: {value!r} is not a chat template (mergekit takes 'auto', a bundled "
                                 "name or a Jinja text of at least 20 characters with '{')")
            return None
        return value

    def tokenizer(self) -> None:
        doc = self.doc
        source = doc.get("tokenizer_source")
        tokenizer = doc.get("tokenizer")
        if tokenizer is not None:
            if not isinstance(tokenizer, dict):
                self.problems.append(f"tokenizer: expected a mapping, got {tokenizer!r}")
                return
            if tokenizer.get("tokens") or tokenizer.get("pad_to_multiple_of"):
                self.problems.append("tokenizer.tokens / tokenizer.pad_to_multiple_of: changing the vocabulary is "
                                     "not supported; streammerge keeps the base's tokenizer and embeddings")
            source = tokenizer.get("source", source)
            where = "tokenizer.source"
        else:
            where = "tokenizer_source"
        if source not in (None, "base"):
            self.problems.append(f"{where}: {source!r} is not supported (a union or another model's vocabulary "
                                 "permutes the embeddings); only 'base' (the base's tokenizer, copied unchanged)")


def translate_mergekit(doc: Any, source: str = "config") -> MergekitTranslation:
    """Translate a mergekit config document into a recipe with ``conventions: mergekit``.

    Raises:
        PlanError: listing every problem, each with its field path (``models[1].parameters.density``).
    """
    if not isinstance(doc, dict):
        raise PlanError([f"{source}: a mergekit config is a mapping (merge_method, models, ...), "
                         f"got {type(doc).__name__}"])
    translator = _Translator(doc)
    recipe = translator.translate()
    if recipe is None or translator.problems:
        problems = translator.problems or ["merge_method: nothing to translate"]
        raise PlanError([f"{source}: {p}" for p in problems])
    return MergekitTranslation(recipe, translator.notes)
