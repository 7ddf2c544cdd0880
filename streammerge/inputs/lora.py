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
from .keymap import IDENTITY, KeyMapping, find_key_mapping
from .kinds import LORA_BIAS, REPLACEMENT
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

    ``kind`` is ``LORA_BIAS`` (ΔW = scale · bias) or ``REPLACEMENT`` (the tensor replaces the
    base tensor: modules_to_save, saved embedding layers); see ``kinds.py``.
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
    key_mapping: KeyMapping = IDENTITY
    """How its module names were mapped onto the base's tensor names."""
    skipped: tuple[str, ...] = ()
    """Saved tensors left out because the base has no counterpart (``skip_missing``)."""

    @property
    def header(self) -> SafetensorsHeader:
        return self.weights.headers[self.weights.shards[0]]


def resolve_target(name: str, base_names: Collection[str]) -> str | None:
    """``name`` as a base tensor name, as it is or with a ``model.`` prefix added or removed (a quick look;
    the adapter's module mapping as a whole is ``keymap.find_key_mapping``)."""
    return next((n for n in (name, "model." + name, name.removeprefix("model.")) if n in base_names), None)


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
                      allow_pickle: bool = False, skip_missing: bool = False,
                      accept: Collection[str] = ()) -> LoraAdapter:
    """Parse an adapter directory; append every mismatch with the base to ``problems``.

    Module names are mapped onto the base's tensor names with the one prefix mapping that fits
    every LoRA module (``keymap.py``): an adapter saved from a task model merges into its backbone.

    Args:
        root: the adapter directory.
        base_names: tensor names of the base model.
        problems: receives every mismatch with the base.
        allow_pickle: read a pickle-only adapter (``adapter_model.bin``) through
            ``torch.load(weights_only=True)``; otherwise it is refused unread.
        skip_missing: leave out saved tensors the base has no counterpart for (a task head in
            ``modules_to_save``) instead of refusing them; they are listed in ``skipped``.
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
    saved: list[tuple[str, str]] = []  # (key, base-side name) of modules_to_save / saved embedding layers
    for key in header.tensors:
        name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        match = _LORA_KEY.match(name)
        if match is None:
            saved.append((key, name.replace(_BASE_LAYER + ".", ".")))
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
    if not factors and not saved:
        problems.append(f"{where}: {ADAPTER_WEIGHTS_NAME} holds no tensors")
        return LoraAdapter(root=root, settings=settings, weights=layout, modules=(), tensors=())

    complete = [m for m, parts in factors.items() if _factor_keys(parts) is not None]
    mapping, candidates = find_key_mapping([m + ".weight" for m in complete], [n for _, n in saved], base_names)
    if mapping is None:
        listed = "; ".join(m.describe() for m in candidates)
        problems.append(f"{where}: its module names fit the base model's tensors under {len(candidates)} different "
                        f"prefix mappings ({listed}); rename the adapter's keys so that only one fits")
        return LoraAdapter(root=root, settings=settings, weights=layout, modules=(), tensors=())

    modules: list[LoraModule] = []
    extra: list[AdapterTensor] = []
    skipped: list[str] = []
    for key, plain in saved:
        target = mapping.apply(plain)
        if target in base_names:
            extra.append(AdapterTensor(target=target, key=key, kind=REPLACEMENT.name))
        elif skip_missing:
            skipped.append(key)
        else:
            problems.append(f"{where}: tensor {key!r} replaces {target!r}, which the base model does not have "
                            "(a task head saved through modules_to_save?); pass --skip-missing to leave it out")
    for module, parts in factors.items():
        keys = _factor_keys(parts)
        if keys is None:
            problems.append(f"{where}: module {module!r} has only one of its LoRA factors ({sorted(parts)})")
            continue
        embedding, a_key, b_key = keys
        target = mapping.apply(module + ".weight")
        if target not in base_names:
            problems.append(f"{where}: module {module!r} has no base tensor {target!r} in the base model")
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
                extra.append(AdapterTensor(target=bias_target, key=bias_key, kind=LORA_BIAS.name, scale=scale))
    return LoraAdapter(root=root, settings=settings, weights=layout, modules=tuple(modules), tensors=tuple(extra),
                       key_mapping=mapping, skipped=tuple(skipped))


def _factor_keys(parts: dict[str, str]) -> tuple[bool, str, str] | None:
    """(is an embedding LoRA, A key, B key) of a module's saved parts, or None when a factor is missing."""
    embedding = "lora_embedding_A" in parts or "lora_embedding_B" in parts
    a_key = parts.get("lora_embedding_A" if embedding else "lora_A")
    b_key = parts.get("lora_embedding_B" if embedding else "lora_B")
    if a_key is None or b_key is None:
        return None
    return embedding, a_key, b_key
