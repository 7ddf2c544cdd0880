"""A merge recipe: frozen dataclasses, the one description of a job that the CLI, recipe
files, the plan hash, the journal and the model card all share.

Each field's ``metadata["help"]`` is also its ``--flag`` help text and its documentation in a
recipe file.  ``recipe_from_dict`` reads a YAML/JSON document into a ``Recipe`` and reports
every problem at once, each with its path in the document (``inputs[1].weight``);
``Recipe.to_dict`` writes the plain, YAML-loadable form back.
"""

from __future__ import annotations

import hashlib
import json
import math
import types
from dataclasses import MISSING, dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any, ClassVar, Union, get_args, get_origin, get_type_hints

from .errors import InputError, PlanError, StreamMergeError
from .conventions import CONVENTIONS, convention_defaults
from .input_spec import InputSpec, Weight, WeightOverride, field_with_help, format_weight, interpolate

__all__ = [
    "INPUT_KINDS", "DEVICES", "OUTPUT_FORMATS", "WeightOverride", "InputSpec", "Recipe", "Weight",
    "recipe_from_dict", "read_document", "load_recipe_file", "dump_recipe_yaml", "parse_size", "interpolate",
    "format_weight",
]

INPUT_KINDS = ("adapter", "model")
DEVICES = ("auto", "cpu", "cuda")
OUTPUT_FORMATS = ("model", "adapter", "gguf")
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")

_field = field_with_help


def _tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


@dataclass(frozen=True)
class Recipe:
    """Everything that determines the merged bytes (and, marked compare=False, how to run it)."""

    base: str = _field("", help="base model: a local directory (safetensors, single file or sharded), a GGUF file "
                                   "(or the first of a split set, or a directory holding one) or a Hub repo id",
                       flag="--base", metavar="DIR_OR_REPO")
    inputs: tuple[InputSpec, ...] = _field((), help="adapters and/or full fine-tunes, in order")
    method: str = _field("task_arithmetic", help="merge method (see `streammerge methods`)", flag="--method")
    params: tuple[tuple[str, Any], ...] = _field((), help="method parameters, validated against the method",
                                                 mapping=True)
    dtype: str | None = _field(None, help="output dtype of floating tensors (bfloat16, float16, float32; "
                                          "float8_e4m3fn: an FP8 base written as FP8 again); default: each base "
                                          "tensor's own dtype (float32 for adapter output; float16 for a quantized "
                                          "GGUF base's tensors)",
                               flag="--dtype")
    chat_template: str | None = _field(None, help="chat template written into the output's tokenizer_config.json "
                                                  "(and chat_template.jinja when the base has one): a Jinja "
                                                  "template, 'base' (the base's, unchanged) or 'auto' (the most "
                                                  "common one of the base and the full-model inputs, as mergekit)")
    seed: int = _field(0, help="seed of the per-tensor random generators (DARE)", flag="--seed")
    conventions: str = _field("streammerge", help="parameter defaults of the merge method: 'streammerge' (its own) or "
                                                  "'mergekit' (mergekit 0.1.5's normalizations, rescale, banding and "
                                                  "trims; see README, \"Coming from mergekit\"); params given win",
                              flag="--conventions")
    max_shard_size: int | None = _field(None, help="reshard the output into files of at most SIZE (e.g. 5GB); "
                                                   "default: the base's layout", flag="--max-shard-size",
                                        metavar="SIZE", parse="size")
    revision: str | None = _field(None, help="Hub revision (branch, tag or commit) of the base when it is a repo id",
                                  flag="--revision", metavar="REV")
    output_format: str = _field("model", help="'model': a full HF model directory; 'adapter': a merged PEFT LoRA "
                                              "adapter (exact for low-rank results, else truncated SVD to --rank)",
                                flag="--output-format")
    rank: int | None = _field(None, help="adapter output: truncate every update to this rank (truncated SVD); "
                                         "needed for methods whose result is dense", flag="--rank", metavar="K")
    min_relative_norm: float | None = _field(
        None, help="adapter output: leave out a matrix whose dense update is small, ||dW||_F <= X * ||W0||_F "
                   "(e.g. 0.001; applies where the base values are read: full fine-tunes, DoRA, modules_to_save); "
                   "each module's ||dW||/||W0|| is reported", flag="--min-relative-norm", metavar="X")
    gguf_type: str | None = _field(None, help="GGUF output: tensor type of the matrices (f32, f16, bf16, q8_0); "
                                              "default: bf16 for a bf16 base, else f16; over a GGUF base, its own type if "
                                              "f16/bf16/q8_0, else q8_0 (norms are always f32)",
                                   flag="--gguf-type")
    skip_missing: bool = _field(False, help="leave out adapter tensors the base has no counterpart for (e.g. a task "
                                            "head saved through modules_to_save) instead of refusing them",
                                flag="--skip-missing")
    device: str = _field("auto", help="worker device; auto = CUDA when present", flag="--device", compare=False)
    max_memory: int | None = _field(None, help="refuse to start if the predicted peak host memory exceeds SIZE "
                                               "(e.g. 2GB)", flag="--max-memory", metavar="SIZE", parse="size",
                                    compare=False)
    max_gpu_memory: int | None = _field(None, help="merge on the CPU any tensor whose working set on the GPU would "
                                                   "exceed SIZE", flag="--max-gpu-memory", metavar="SIZE",
                                        parse="size", compare=False)
    out: str | None = _field(None, help="output directory (new or empty)", flag="--out", metavar="DIR", compare=False)

    _NOT_HASHED: ClassVar[tuple[str, ...]] = ("device", "out", "max_memory", "max_gpu_memory")

    def __post_init__(self) -> None:
        object.__setattr__(self, "inputs", _tuple(self.inputs))
        object.__setattr__(self, "params", tuple(tuple(p) for p in self.params))

    def validate(self) -> list[str]:
        """Every problem with the recipe's own fields (not the files they name), with its path."""
        problems = []
        if not self.base:
            problems.append("base: no base model given (--base, or `base:` in the recipe file)")
        if not self.inputs:
            problems.append("inputs: none given; pass at least one --adapter or --model (or list `inputs:`)")
        for i, spec in enumerate(self.inputs):
            where = f"inputs[{i}] ({spec.path!r})"
            if not spec.path:
                problems.append(f"inputs[{i}].path: empty")
            if spec.kind not in INPUT_KINDS:
                problems.append(f"{where}.kind: {spec.kind!r} must be one of {list(INPUT_KINDS)}")
            problems += _weight_problems(f"{where}.weight", spec.weight)
            for j, o in enumerate(spec.overrides):
                if not o.match:
                    problems.append(f"{where}.overrides[{j}].match: empty pattern")
                if o.weight is None and not o.params:
                    problems.append(f"{where}.overrides[{j}]: sets neither a weight nor params")
                if o.weight is not None:
                    problems += _weight_problems(f"{where}.overrides[{j}].weight", o.weight)
            for at, _name, value in spec.param_values():
                problems += _weight_problems(f"{where}.{at}", value)
        if self.device not in DEVICES:
            problems.append(f"device: {self.device!r} must be one of {list(DEVICES)}")
        for name in ("max_memory", "max_gpu_memory"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                problems.append(f"{name}: must be positive, got {getattr(self, name)}")
        if self.max_shard_size is not None and self.max_shard_size <= 0:
            problems.append(f"max_shard_size: must be positive, got {self.max_shard_size}")
        if self.output_format not in OUTPUT_FORMATS:
            problems.append(f"output_format: {self.output_format!r} must be one of {list(OUTPUT_FORMATS)}")
        if self.gguf_type is not None and self.gguf_type not in GGUF_TYPES:
            problems.append(f"gguf_type: {self.gguf_type!r} must be one of {list(GGUF_TYPES)}")
        if self.rank is not None and self.rank <= 0:
            problems.append(f"rank: must be a positive integer, got {self.rank}")
        if self.min_relative_norm is not None:
            if not (math.isfinite(self.min_relative_norm) and self.min_relative_norm >= 0):
                problems.append(f"min_relative_norm: must be a number >= 0, got {self.min_relative_norm}")
            if self.output_format != "adapter":
                problems.append("min_relative_norm: only applies with output_format 'adapter' (it leaves small "
                                "updates out of an extracted adapter); drop --min-relative-norm")
        if self.conventions not in CONVENTIONS:
            problems.append(f"conventions: {self.conventions!r} must be one of {list(CONVENTIONS)}")
        problems += _method_problems(self.method, self.given_params(), self.inputs)
        if self.chat_template is not None and self.output_format != "model":
            problems.append("chat_template: only applies with output_format 'model' (it is written into the "
                            "output's tokenizer_config.json)")
        return problems

    def given_params(self) -> tuple[tuple[str, Any], ...]:
        """The method parameters to resolve: the convention's defaults overlaid with ``params``."""
        given = {**convention_defaults(self.method, self.conventions), **dict(self.params)}
        return tuple(sorted(given.items()))

    def to_dict(self) -> dict[str, Any]:
        """Plain data (dicts, lists, scalars) that ``recipe_from_dict`` and YAML read back."""
        return _plain(self)

    @classmethod
    def from_dict(cls, doc: Any) -> Recipe:
        """Read a recipe document (see ``recipe_from_dict``)."""
        return recipe_from_dict(doc)

    def fingerprint(self) -> str:
        """SHA-256 of the fields that determine the output bytes."""
        doc = self.to_dict()
        for name in self._NOT_HASHED:
            doc.pop(name)
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def _weight_problems(where: str, weight: Weight) -> list[str]:
    values = weight if isinstance(weight, tuple) else (weight,)
    if not values:
        return [f"{where}: an empty list; give a number or at least one value"]
    if not all(math.isfinite(v) for v in values):
        return [f"{where}: {format_weight(weight)} holds a non-finite value"]
    return []


def _method_problems(method_name: str, params: tuple[tuple[str, Any], ...],
                     inputs: tuple[InputSpec, ...] = ()) -> list[str]:
    from .methods import get_method  # methods are pure math; imported late to keep this module light

    try:
        method = get_method(method_name)
    except StreamMergeError as e:
        return [f"method: {e}"]
    try:
        method.resolve_params(dict(params))
    except StreamMergeError as e:
        return [f"params: {e}"]
    per_input = [p.name for p in method.params if p.per_input]
    problems = []
    for i, spec in enumerate(inputs):
        for at, name, value in spec.param_values():
            where = f"inputs[{i}] ({spec.path!r}).{at}"
            if name not in per_input:
                problems.append(f"{where}: method {method_name!r} takes no per-input parameter {name!r}; "
                                f"its per-input parameters: {', '.join(per_input) or '(none)'}")
                continue
            for v in value if isinstance(value, tuple) else (value,):
                try:  # every listed value must be valid on its own (interpolation stays between them)
                    method.resolve_params({**dict(params), name: v})
                except StreamMergeError as e:
                    problems.append(f"{where}: {e}")
                    break
        if spec.param_values() and dict(params).get("scope", "tensor") != "tensor":
            problems.append(f"inputs[{i}] ({spec.path!r}).params: per-input parameters need scope 'tensor' "
                            "(scope 'global' selects with one density per input over the whole model)")
    return problems


# --- documents <-> dataclasses -------------------------------------------------------------

def _plain(value: Any, mapping: bool = False) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name), f.metadata.get("mapping", False)) for f in fields(value)}
    if mapping:
        return {k: _plain(v) for k, v in value}
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


def _describe(hint: Any) -> str:
    if get_origin(hint) in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in get_args(hint))
    if get_origin(hint) is tuple:
        return f"a list of {_describe(get_args(hint)[0])}s"
    if hint is type(None):
        return "null"
    if is_dataclass(hint):
        return "a mapping"
    return {float: "number", int: "integer", str: "string", bool: "boolean"}.get(hint, str(hint))


def _accepts(hint: Any, value: Any) -> bool:
    if get_origin(hint) is tuple:
        return isinstance(value, (list, tuple))
    if is_dataclass(hint):
        return isinstance(value, dict) or (isinstance(value, str) and hasattr(hint, "_SHORTHAND"))
    if hint is float:
        return (isinstance(value, (int, float)) and not isinstance(value, bool)) or _is_number_text(value)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _is_number_text(value: Any) -> bool:
    # PyYAML reads 1e-3 (no dot) as a string; accept it where a number is expected.
    if not isinstance(value, str):
        return False
    try:
        float(value)
    except ValueError:
        return False
    return True


def _convert(value: Any, hint: Any, path: str, problems: list[str]) -> Any:
    if hint is Any:
        return value
    if get_origin(hint) in (Union, types.UnionType):
        options = get_args(hint)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is not type(None) and _accepts(option, value):
                return _convert(value, option, path, problems)
        problems.append(f"{path}: expected {_describe(hint)}, got {value!r}")
        return None
    if not _accepts(hint, value):
        problems.append(f"{path}: expected {_describe(hint)}, got {value!r}")
        return None
    if get_origin(hint) is tuple:
        item = get_args(hint)[0]
        return tuple(_convert(v, item, f"{path}[{i}]", problems) for i, v in enumerate(value))
    if is_dataclass(hint):
        return _dataclass_from(hint, value, path, problems)
    if hint is float:
        return float(value)
    return value


def _dataclass_from(cls: Any, doc: Any, path: str, problems: list[str]) -> Any:
    if isinstance(doc, str):
        doc = {cls._SHORTHAND: doc}
    prefix = f"{path}." if path else ""
    hints = get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    for key in doc:
        if key not in known:
            problems.append(f"{prefix}{key}: unknown field; known fields: {', '.join(known)}")
    values: dict[str, Any] = {}
    for name, f in known.items():
        where = f"{prefix}{name}"
        if name not in doc:
            if f.default is MISSING:
                problems.append(f"{where}: missing")
            continue
        raw = doc[name]
        if f.metadata.get("mapping"):
            if raw is None:
                raw = {}
            if not isinstance(raw, dict) or not all(isinstance(k, str) for k in raw):
                problems.append(f"{where}: expected a mapping of name: value, got {raw!r}")
                continue
            values[name] = tuple(sorted(raw.items()))
            continue
        if f.metadata.get("parse") == "size" and isinstance(raw, str):
            try:
                values[name] = parse_size(raw)
            except InputError as e:
                problems.append(f"{where}: {e}")
            continue
        if raw is None and get_origin(hints[name]) is tuple:
            raw = []
        before = len(problems)
        converted = _convert(raw, hints[name], where, problems)
        if len(problems) == before:
            values[name] = converted
    missing = [n for n, f in known.items() if f.default is MISSING and n not in values]
    if missing:
        return None
    return cls(**values)


_ENVELOPE_KEY = "recipe"
"""``streammerge_recipe.json`` wraps the recipe with facts about the run under this key."""


def recipe_from_dict(doc: Any, source: str = "recipe") -> Recipe:
    """Read a recipe document: a mapping of Recipe fields, or the saved ``{recipe: {...}, ...}``.

    Raises:
        PlanError: listing every problem, each with its path in the document.
    """
    if isinstance(doc, dict) and isinstance(doc.get(_ENVELOPE_KEY), dict):
        doc = doc[_ENVELOPE_KEY]
    if not isinstance(doc, dict):
        raise PlanError([f"{source}: a recipe must be a mapping of fields (base, inputs, method, ...), "
                         f"got {type(doc).__name__}"])
    problems: list[str] = []
    recipe = _dataclass_from(Recipe, doc, "", problems)
    if problems:
        raise PlanError([f"{source}: {p}" for p in problems])
    return recipe


def read_document(path: str | Path) -> Any:
    """The parsed YAML (or JSON) document of a recipe or config file.

    Raises:
        InputError: the file cannot be read or parsed.
    """
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read recipe file {str(path)!r}: {e}") from e
    try:
        # JSON is YAML, but YAML 1.1 reads JSON's 1e-06 as a string: parse .json files as JSON.
        return json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except json.JSONDecodeError as e:
        raise InputError(f"recipe file {str(path)!r} is not valid JSON: {e}") from e
    except yaml.YAMLError as e:
        raise InputError(f"recipe file {str(path)!r} is not valid YAML: {e}") from e


def load_recipe_file(path: str | Path) -> Recipe:
    """Read a YAML (or JSON) recipe file; every structural problem is reported at once.

    Raises:
        InputError: the file cannot be read or parsed.
        PlanError: listing every problem with its YAML path.
    """
    return recipe_from_dict(read_document(path), source=str(path))


def dump_recipe_yaml(recipe: Recipe) -> str:
    """The recipe as a YAML document that ``load_recipe_file`` reads back to an equal recipe."""
    import yaml

    return yaml.safe_dump(recipe.to_dict(), sort_keys=False, allow_unicode=True)


SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """Parse "5GB", "500MiB", "1024" into bytes."""
    s = text.strip().upper().replace(" ", "")
    number = s.rstrip("KMGTIB")
    unit = s[len(number):]
    try:
        value = float(number)
    except ValueError:
        raise InputError(f"cannot read size {text!r}; use e.g. 5GB, 500MiB or a byte count") from None
    if unit not in SIZE_UNITS:
        raise InputError(f"unknown size unit in {text!r}; use one of B, KB, MB, GB, KiB, MiB, GiB")
    return int(value * SIZE_UNITS[unit])
