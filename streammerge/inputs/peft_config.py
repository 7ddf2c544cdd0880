"""``adapter_config.json``: the fields that change what a LoRA adapter's weights mean.

Every field that would make a plain ``W0 + s·B·A`` merge wrong is either handled here
(scaling, rsLoRA, rank/alpha patterns, fan_in_fan_out, lora_bias, modules_to_save) or
refused with an ``UnsupportedAdapterError`` naming the adapter and the field.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import AdapterError, UnsupportedAdapterError

# Values of init_lora_weights that only initialise A/B and leave the base untouched.
_PLAIN_INITS = {True, False, "gaussian", "true", "false"}
# Initialisations that rewrite the base weights: the saved A/B are relative to a modified base.
_BASE_MODIFYING_INITS = ("pissa", "olora", "corda", "loftq", "eva", "orthogonal", "lora_ga")
# Fields whose truthy value means the adapter is not plain LoRA.
_UNSUPPORTED_TRUTHY = {
    "layer_replication": "layer replication changes the model's layer structure",
    "trainable_token_indices": "trainable token deltas are not supported yet",
    "use_qalora": "QA-LoRA adapters are not supported",
    "megatron_config": "Megatron-parallel LoRA layers are not supported",
    "use_bdlora": "block-diagonal LoRA is not supported",
    "alora_invocation_tokens": "activated LoRA (aLoRA) applies only after invocation tokens; a merge cannot express it",
}
# Features a caller may merge (``accept=``); refused by name otherwise.
DORA_FEATURE = "use_dora"
TARGET_PARAMETERS_FEATURE = "target_parameters"
_OPT_IN = {
    DORA_FEATURE: "DoRA adapters carry a magnitude vector; merging them as plain LoRA would be wrong",
    TARGET_PARAMETERS_FEATURE: "LoRA on raw nn.Parameters (e.g. MoE experts) is not supported by this command",
}
# PEFT's ParamWrapper (target_parameters) refuses these at creation, so such an adapter cannot exist.
_PARAM_WRAPPER_REFUSES = ("use_dora", "lora_bias", "fan_in_fan_out", "lora_dropout")


@dataclass(frozen=True)
class LoraSettings:
    """The parsed, validated settings of one LoRA adapter."""

    path: Path
    r: int
    lora_alpha: float
    use_rslora: bool
    fan_in_fan_out: bool
    lora_bias: bool
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    modules_to_save: tuple[str, ...] = ()
    base_model_name_or_path: str | None = None
    base_model_class: str | None = None
    use_dora: bool = False
    target_parameters: tuple[str, ...] = ()

    def targeted_parameters(self, module: str) -> tuple[str, ...]:
        """Names of ``module``'s parameters that ``target_parameters`` wraps (PEFT's suffix match)."""
        found = []
        for target in self.target_parameters:
            owner, _, param = target.rpartition(".")
            if module == owner or module.endswith("." + owner) or not owner:
                found.append(param)
        return tuple(found)

    def rank_and_alpha(self, module: str) -> tuple[int, float]:
        """The (r, α) PEFT uses for ``module`` (pattern keys match a dotted suffix, as in PEFT)."""
        r = self.r
        alpha = self.lora_alpha
        key = _pattern_key(self.rank_pattern, module)
        if key is not None:
            r = self.rank_pattern[key]
        key = _pattern_key(self.alpha_pattern, module)
        if key is not None:
            alpha = self.alpha_pattern[key]
        return r, alpha

    def scaling(self, module: str) -> float:
        """``s = α / r`` (``α / sqrt(r)`` with rsLoRA) for ``module``."""
        r, alpha = self.rank_and_alpha(module)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def _pattern_key(patterns: dict[str, Any], module: str) -> str | None:
    # Same rule as peft.utils.other.get_pattern_key: the first key matching a dotted suffix.
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def _refuse(path: Path, field_name: str, value: Any, why: str) -> UnsupportedAdapterError:
    return UnsupportedAdapterError(
        f"adapter {str(path)!r}: {field_name}={value!r} is not supported: {why}")


def parse_lora_settings(path: Path, doc: dict[str, Any], accept: Collection[str] = ()) -> LoraSettings:
    """Validate an adapter_config.json document; refuse every unsupported feature by name.

    ``accept``: opt-in features the caller merges (``DORA_FEATURE`` via ``inputs.dora``,
    ``TARGET_PARAMETERS_FEATURE`` via ``inputs.moe``); any other is refused.
    """
    peft_type = doc.get("peft_type")
    if peft_type != "LORA":
        raise _refuse(path, "peft_type", peft_type, "only LoRA adapters can be merged")
    for name, why in _UNSUPPORTED_TRUTHY.items():
        if doc.get(name):
            raise _refuse(path, name, doc[name], why)
    for name, why in _OPT_IN.items():
        if doc.get(name) and name not in accept:
            raise _refuse(path, name, doc[name], why)
    use_dora = bool(doc.get("use_dora", False))
    if use_dora and doc.get("lora_bias"):
        raise _refuse(path, "lora_bias", doc["lora_bias"], "PEFT itself refuses lora_bias together with use_dora")
    target_parameters = doc.get("target_parameters") or ()
    if not isinstance(target_parameters, list | tuple) or not all(isinstance(t, str) for t in target_parameters):
        raise AdapterError(f"adapter {str(path)!r}: target_parameters must be a list of parameter names, "
                           f"found {target_parameters!r:.200}")
    for name in _PARAM_WRAPPER_REFUSES if target_parameters else ():
        if doc.get(name):
            raise _refuse(path, name, doc[name], "PEFT's ParamWrapper (target_parameters) refuses it, so PEFT "
                          "cannot load or merge this adapter either")
    init = doc.get("init_lora_weights", True)
    if init not in _PLAIN_INITS:
        why = ("this initialisation rewrites the base weights, so the adapter is relative to a modified base; "
               "convert it to a plain LoRA first (PEFT: save_pretrained(..., path_initial_model_for_weight_conversion=...))")
        if not (isinstance(init, str) and init.lower().startswith(_BASE_MODIFYING_INITS)):
            why = "unknown initialisation"
        raise _refuse(path, "init_lora_weights", init, why)
    if doc.get("loftq_config"):
        raise _refuse(path, "loftq_config", doc["loftq_config"], "LoftQ adapters are relative to a quantized base")
    bias = doc.get("bias", "none")
    if bias not in ("none", None):
        raise _refuse(path, "bias", bias, "adapters that train the base biases are not supported yet; use lora_bias")
    try:
        r = int(doc["r"])
        alpha = float(doc.get("lora_alpha", r))
        rank_pattern = {str(k): int(v) for k, v in (doc.get("rank_pattern") or {}).items()}
        alpha_pattern = {str(k): float(v) for k, v in (doc.get("alpha_pattern") or {}).items()}
    except (KeyError, TypeError, ValueError, OverflowError, AttributeError) as e:
        raise AdapterError(f"adapter {str(path)!r}: adapter_config.json has a missing or invalid r / lora_alpha / "
                           f"rank_pattern / alpha_pattern ({e!r:.300})") from e
    if r <= 0 or any(v <= 0 for v in rank_pattern.values()):
        raise AdapterError(f"adapter {str(path)!r}: ranks must be positive (r={r}, rank_pattern={rank_pattern})")
    if not all(math.isfinite(a) for a in (alpha, *alpha_pattern.values())):
        raise AdapterError(f"adapter {str(path)!r}: lora_alpha / alpha_pattern must be finite numbers "
                           f"(lora_alpha={alpha}, alpha_pattern={alpha_pattern})")
    for key in (*rank_pattern, *alpha_pattern):
        try:
            re.compile(key)
        except re.error as e:  # PEFT matches pattern keys as regular expressions
            raise AdapterError(f"adapter {str(path)!r}: rank_pattern / alpha_pattern key {key!r} is not a valid "
                               f"regular expression ({e})") from e
    modules_to_save = doc.get("modules_to_save") or ()
    if not isinstance(modules_to_save, list | tuple) or not all(isinstance(m, str) for m in modules_to_save):
        raise AdapterError(f"adapter {str(path)!r}: modules_to_save must be a list of module names, "
                           f"found {modules_to_save!r:.200}")
    auto = doc.get("auto_mapping") or {}
    return LoraSettings(
        path=path,
        r=r,
        lora_alpha=alpha,
        use_rslora=bool(doc.get("use_rslora", False)),
        fan_in_fan_out=bool(doc.get("fan_in_fan_out", False)),
        lora_bias=bool(doc.get("lora_bias", False)),
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        modules_to_save=tuple(modules_to_save),
        base_model_name_or_path=_string(doc.get("base_model_name_or_path")),
        base_model_class=_string(auto.get("base_model_class") if isinstance(auto, dict) else None),
        use_dora=use_dora,
        target_parameters=tuple(target_parameters),
    )


def _string(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def read_lora_settings(config_path: Path, accept: Collection[str] = ()) -> LoraSettings:
    """Read and validate ``adapter_config.json`` (``accept``: see ``parse_lora_settings``)."""
    try:
        doc = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise AdapterError(f"cannot read adapter config {str(config_path)!r}: {str(e)[:300]}") from e
    if not isinstance(doc, dict):
        raise AdapterError(f"adapter config {str(config_path)!r} must be a JSON object")
    return parse_lora_settings(config_path.parent, doc, accept)


def peft_lora_config(*, base: str, target_modules: list[str] | str, r: int, lora_alpha: float,
                     revision: str | None = None, task_type: str | None = None,
                     rank_pattern: dict[str, int] | None = None, alpha_pattern: dict[str, float] | None = None,
                     modules_to_save: list[str] | None = None, fan_in_fan_out: bool = False,
                     lora_bias: bool = False, lora_dropout: float = 0.0, inference_mode: bool = True) -> dict[str, Any]:
    """An ``adapter_config.json`` document that PEFT loads as a plain LoRA (and streammerge merges).

    ``init_lora_weights`` is PEFT's default: the saved A and B are loaded over its initialisation.
    """
    return {
        "peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": base, "revision": revision,
        "r": r, "lora_alpha": lora_alpha, "rank_pattern": dict(rank_pattern or {}),
        "alpha_pattern": dict(alpha_pattern or {}), "target_modules": target_modules,
        "modules_to_save": modules_to_save or None, "fan_in_fan_out": fan_in_fan_out, "lora_bias": lora_bias,
        "bias": "none", "use_rslora": False, "use_dora": False, "init_lora_weights": True,
        "lora_dropout": lora_dropout, "inference_mode": inference_mode, "layers_to_transform": None,
        "layers_pattern": None,
    }
