"""One merge input of a recipe: its path and kind, its user weight and per-input method parameters
(numbers, or lists interpolated over the layers), and per-module overrides of both.

``recipe.py`` holds the recipe around it; this module only needs the standard library.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import MISSING, dataclass, field
from typing import Any, ClassVar, Union

__all__ = ["Weight", "WeightOverride", "InputSpec", "interpolate", "format_weight", "field_with_help"]

Weight = Union[float, tuple[float, ...]]
"""One number, or a list interpolated linearly from the first layer to the last."""


def field_with_help(default: Any = MISSING, help: str = "", compare: bool = True, **meta: Any) -> Any:
    """A dataclass field whose ``help`` is its CLI help and recipe-file documentation."""
    if default is MISSING:
        return field(compare=compare, metadata={"help": help, **meta})
    return field(default=default, compare=compare, metadata={"help": help, **meta})


def _tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _weights(pairs: Any) -> tuple[tuple[str, Weight], ...]:
    """A ``name: Weight`` mapping as sorted pairs, lists made tuples."""
    items = pairs.items() if isinstance(pairs, dict) else pairs
    return tuple(sorted((str(k), _tuple(v)) for k, v in items))


@dataclass(frozen=True)
class WeightOverride:
    """A different weight and/or method parameters for the tensors whose names match a pattern.

    For the weight and for each parameter separately, the first matching entry that sets it wins.
    """

    match: str = field_with_help(help="glob on base tensor names, e.g. '*.mlp.*' or 'model.layers.1[0-5].*'")
    weight: Weight | None = field_with_help(None, help="the weight there: a number, or a list interpolated across "
                                                       "layers; null leaves the weight to later entries")
    params: tuple[tuple[str, Weight], ...] = field_with_help(
        (), help="per-input method parameters there (e.g. {density: 0.3}), numbers or lists over layers", mapping=True)

    def __post_init__(self) -> None:
        object.__setattr__(self, "weight", _tuple(self.weight))
        object.__setattr__(self, "params", _weights(self.params))


@dataclass(frozen=True)
class InputSpec:
    """One merge input.

    A bare string in a recipe file is short for ``{path: <string>}``.
    """

    _SHORTHAND: ClassVar[str] = "path"

    path: str = field_with_help(help="a PEFT LoRA adapter or a full fine-tuned model: a local directory or a Hub "
                                     "repo id")
    kind: str = field_with_help("adapter", help="'adapter' (PEFT LoRA) or 'model' (full fine-tune; task vector = "
                                                "model - base; the base itself adds only its weight)")
    weight: Weight = field_with_help(1.0, help="user weight w_i: a number, or a list of numbers interpolated "
                                               "linearly from the first to the last layer (tensors outside layers "
                                               "use the first)")
    revision: str | None = field_with_help(None, help="Hub revision (branch, tag or commit) when path is a repo id")
    overrides: tuple[WeightOverride, ...] = field_with_help(
        (), help="per-module weights and parameters: [{match: GLOB, weight: W, params: {...}}, ...]; for each "
                 "value the first matching entry that sets it wins")
    include: tuple[str, ...] = field_with_help((), help="globs on base tensor names: merge only matching tensors "
                                                        "from this input")
    exclude: tuple[str, ...] = field_with_help((), help="globs on base tensor names: never merge matching tensors "
                                                        "from this input")
    params: tuple[tuple[str, Weight], ...] = field_with_help(
        (), help="this input's own values of per-input method parameters (density, gamma of the sparsifying "
                 "methods): numbers or lists over layers; they replace the method's params for this input",
        mapping=True)

    def __post_init__(self) -> None:
        for name in ("weight", "overrides", "include", "exclude"):
            object.__setattr__(self, name, _tuple(getattr(self, name)))
        object.__setattr__(self, "params", _weights(self.params))

    def selects(self, tensor: str) -> bool:
        """Whether this input may change ``tensor`` (its include/exclude filters)."""
        if self.include and not any(fnmatch.fnmatchcase(tensor, p) for p in self.include):
            return False
        return not any(fnmatch.fnmatchcase(tensor, p) for p in self.exclude)

    def weight_for(self, tensor: str, layer: int | None, num_layers: int) -> float:
        """The weight of this input on ``tensor`` (in layer ``layer`` of ``num_layers``, if any)."""
        weight = next((o.weight for o in self.overrides
                       if o.weight is not None and fnmatch.fnmatchcase(tensor, o.match)), self.weight)
        return interpolate(weight, layer, num_layers)

    def params_for(self, tensor: str, layer: int | None, num_layers: int) -> tuple[tuple[str, float], ...]:
        """This input's own method parameters on ``tensor`` (only those it sets), as sorted pairs."""
        values = dict(self.params)
        for name in sorted({n for o in self.overrides for n, _ in o.params}):
            found = next((dict(o.params)[name] for o in self.overrides
                          if name in dict(o.params) and fnmatch.fnmatchcase(tensor, o.match)), None)
            if found is not None:
                values[name] = found
        return tuple((name, interpolate(v, layer, num_layers)) for name, v in sorted(values.items()))

    def param_values(self) -> list[tuple[str, str, Weight]]:
        """Every per-input parameter setting as ``(where, name, value)`` (for validation)."""
        found = [(f"params.{n}", n, v) for n, v in self.params]
        for j, o in enumerate(self.overrides):
            found += [(f"overrides[{j}].params.{n}", n, v) for n, v in o.params]
        return found


def interpolate(weight: Weight, layer: int | None, num_layers: int) -> float:
    """A weight at ``layer``: lists are spread evenly from layer 0 to ``num_layers - 1``.

    Tensors outside the layer stack (embeddings, final norm, lm_head) get the first value.
    """
    if not isinstance(weight, tuple):
        return float(weight)
    if len(weight) == 1 or layer is None or num_layers <= 1:
        return float(weight[0])
    position = layer / (num_layers - 1) * (len(weight) - 1)
    low = min(int(math.floor(position)), len(weight) - 2)
    frac = position - low
    return float(weight[low] * (1 - frac) + weight[low + 1] * frac)


def format_weight(weight: Weight) -> str:
    if isinstance(weight, tuple):
        return "[" + ", ".join(f"{w:g}" for w in weight) + "]"
    return f"{weight:g}"
