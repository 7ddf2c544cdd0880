"""Map a PEFT LoRA adapter's saved keys onto the base model's tensor names.

PEFT saves ``base_model.model.<module>.lora_A.weight`` [r, d_in] and ``...lora_B.weight``
[d_out, r] for linear layers, ``...lora_embedding_A`` [r, vocab] / ``...lora_embedding_B``
[hidden, r] for embeddings, ``...lora_B.bias`` with ``lora_bias``, ``...lora_magnitude_vector``
[d_out] ([hidden] for embeddings) with DoRA (``use_dora``), and full tensors for
``modules_to_save`` (``<module>.weight``) and saved embedding layers
(``<module>.base_layer.weight``).  This module turns those keys into plain data: which base
tensor each one changes and how (no tensor data is read here).
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from ..errors import AdapterError, InputError
from ..io.header import SafetensorsHeader
from ..io.reader import CheckpointLayout, open_checkpoint
from ..names import ADAPTER_CONFIG_NAME, ADAPTER_PICKLE_NAME, ADAPTER_WEIGHTS_NAME
from .peft_config import LoraSettings, read_lora_settings
from .pickled import convert_pickled_adapter

PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(
    r"^(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)"
    r"(?:\.(?P<adapter>(?!weight$|bias$)[^.]+))?(?P<suffix>\.weight|\.bias)?$")
_BASE_LAYER = ".base_layer"


@dataclass(frozen=True)
class LoraModule:
    """One adapted module: ``ΔW = scale · B @ A`` (stored transposed when ``transposed``).

    ``magnitude_key`` names DoRA's ``lora_magnitude_vector`` (None for plain LoRA); such a
    module's task vector comes from ``inputs.dora``, not from ``scale · B @ A`` alone.
    """

    module: str
    target: str
    a_key: str
    b_key: str
    rank: int
    scale: float
    transposed: bool
    embedding: bool
    magnitude_key: str | None = None


@dataclass(frozen=True)
class AdapterTensor:
    """A non-factor adapter tensor that changes one base tensor.

    ``kind`` is ``"lora_bias"`` (ΔW = scale · bias) or ``"replacement"`` (the tensor
    replaces the base tensor: modules_to_save, saved embedding layers).
    """

    target: str
    key: str
    kind: str
    scale: float = 1.0


@dataclass(frozen=True)
class LoraAdapter:
    """A parsed adapter: settings, weights layout and what it changes in the base."""

    root: Path
    settings: LoraSettings
    weights: CheckpointLayout
    modules: tuple[LoraModule, ...]
    tensors: tuple[AdapterTensor, ...]

    @property
    def header(self) -> SafetensorsHeader:
        return self.weights.headers[self.weights.shards[0]]


def resolve_target(module_weight: str, base_names: Collection[str]) -> str | None:
    """The base tensor name for an adapter-side tensor name.

    Adapters trained on a bare backbone (``AutoModel``) lack the ``model.`` prefix the
    causal-LM checkpoint has, and the reverse; both spellings are tried.
    """
    candidates = [module_weight, "model." + module_weight]
    if module_weight.startswith("model."):
        candidates.append(module_weight[len("model."):])
    for name in candidates:
        if name in base_names:
            return name
    return None


def _adapter_files(root: Path, allow_pickle: bool) -> tuple[Path, Path]:
    if not root.is_dir():
        raise InputError(f"adapter path {str(root)!r} is not a directory")
    config = root / ADAPTER_CONFIG_NAME
    weights = root / ADAPTER_WEIGHTS_NAME
    if not config.is_file():
        raise AdapterError(f"adapter {str(root)!r} has no {ADAPTER_CONFIG_NAME}")
    if not weights.is_file():
        pickled = root / ADAPTER_PICKLE_NAME
        if pickled.is_file() and allow_pickle:
            return config, convert_pickled_adapter(pickled)
        if pickled.is_file():
            raise AdapterError(
                f"adapter {str(root)!r} has only {ADAPTER_PICKLE_NAME} (a pickle, which can run code when loaded); "
                f"streammerge reads {ADAPTER_WEIGHTS_NAME}: re-save it with PEFT's save_pretrained "
                "(safe_serialization=True), or pass --allow-pickle if you trust the file (it is then loaded "
                "with torch.load(weights_only=True))")
        raise AdapterError(f"adapter {str(root)!r} has no {ADAPTER_WEIGHTS_NAME}")
    return config, weights


def load_lora_adapter(root: str | Path, base_names: Collection[str], problems: list[str],
                      allow_pickle: bool = False, accept: Collection[str] = ()) -> LoraAdapter:
    """Parse an adapter directory; append every mismatch with the base to ``problems``.

    Args:
        root: the adapter directory.
        base_names: tensor names of the base model.
        problems: receives every mismatch with the base.
        allow_pickle: read a pickle-only adapter (``adapter_model.bin``) through
            ``torch.load(weights_only=True)``; otherwise it is refused unread.
        accept: opt-in adapter features the caller merges (``peft_config.DORA_FEATURE``: DoRA,
            magnitude keys on the modules; ``TARGET_PARAMETERS_FEATURE``: their keys are
            left to ``inputs.moe``); otherwise refused.

    Raises:
        AdapterError / UnsupportedAdapterError: unreadable or unsupported adapter (fatal).
    """
    root = Path(root)
    config_path, weights_path = _adapter_files(root, allow_pickle)
    settings = read_lora_settings(config_path, accept)
    layout = open_checkpoint(weights_path)
    header = layout.headers[weights_path]
    where = f"adapter {str(root)!r}"

    factors: dict[str, dict[str, str]] = {}
    extra: list[AdapterTensor] = []
    for key in header.tensors:
        name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        match = _LORA_KEY.match(name)
        if match is None:
            # modules_to_save / saved embedding layer: a full replacement of a base tensor.
            plain = name.replace(_BASE_LAYER + ".", ".")
            target = resolve_target(plain, base_names)
            if target is None:
                problems.append(f"{where}: tensor {key!r} replaces {plain!r}, which the base model does not have")
            else:
                extra.append(AdapterTensor(target=target, key=key, kind="replacement"))
            continue
        module, part, suffix = match["module"], match["part"], match["suffix"] or ""
        if settings.target_parameters and settings.targeted_parameters(module.replace(_BASE_LAYER, "")) and (
                _BASE_LAYER in module or resolve_target(module + ".weight", base_names) is None):
            continue  # a ParamWrapper's factors (target_parameters on a non-Linear module): inputs.moe reads them
        if suffix == ".bias":
            if part != "lora_B":
                problems.append(f"{where}: unexpected bias tensor {key!r}")
                continue
            part = "lora_B_bias"
        factors.setdefault(module, {})[part] = key

    modules: list[LoraModule] = []
    for module, parts in factors.items():
        embedding = "lora_embedding_A" in parts or "lora_embedding_B" in parts
        a_key = parts.get("lora_embedding_A" if embedding else "lora_A")
        b_key = parts.get("lora_embedding_B" if embedding else "lora_B")
        if a_key is None or b_key is None:
            problems.append(f"{where}: module {module!r} has only one of its LoRA factors ({sorted(parts)})")
            continue
        target = resolve_target(module + ".weight", base_names)
        if target is None:
            problems.append(f"{where}: module {module!r} has no base tensor {module + '.weight'!r} in the base model")
            continue
        magnitude_key = parts.get("lora_magnitude_vector")
        if (magnitude_key is not None) != settings.use_dora:
            problems.append(f"{where}: module {module!r} " + (
                "has no lora_magnitude_vector although use_dora is set" if settings.use_dora
                else "has a lora_magnitude_vector although use_dora is not set"))
            continue
        r, _alpha = settings.rank_and_alpha(module)
        scale = settings.scaling(module)
        modules.append(LoraModule(
            module=module, target=target, a_key=a_key, b_key=b_key, rank=r, scale=scale,
            transposed=embedding or settings.fan_in_fan_out, embedding=embedding, magnitude_key=magnitude_key))
        bias_key = parts.get("lora_B_bias")
        if bias_key is not None:
            bias_target = target[: -len(".weight")] + ".bias"
            if bias_target not in base_names:
                problems.append(f"{where}: module {module!r} has a LoRA bias but the base has no {bias_target!r}")
            else:
                extra.append(AdapterTensor(target=bias_target, key=bias_key, kind="lora_bias", scale=scale))
    if not modules and not extra:
        problems.append(f"{where}: {ADAPTER_WEIGHTS_NAME} holds no LoRA or replacement tensors")
    return LoraAdapter(root=root, settings=settings, weights=layout, modules=tuple(modules), tensors=tuple(extra))
