"""Run the base model over task data and sum each target module's input statistics.

transformers is an optional dependency of streammerge: it is imported here, lazily, with
a clear error when missing.  The model runs on the worker device (CUDA when present).  A
model larger than memory runs with accelerate's big-model inference: ``max_memory`` gives
``device_map="auto"`` a budget per device, layers past it go to CPU RAM and then to disk
(``offload_dir``) and are streamed to the GPU layer by layer during the forward pass; the
hooks see every layer's inputs on its execution device either way.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any

import torch
from torch import nn

from ..errors import InputError, StreamMergeError
from .subspace import ModuleStats

__all__ = [
    "ALL_LINEAR",
    "ModuleInfo",
    "import_transformers",
    "meta_model",
    "resolve_target_modules",
    "modules_by_name",
    "load_model",
    "load_tokenizer",
    "parse_max_memory",
    "collect_task_stats",
]

ALL_LINEAR = "all-linear"
_CONV1D = "Conv1D"  # transformers.pytorch_utils.Conv1D (GPT-2): weight stored [in, out]


@dataclass(frozen=True)
class ModuleInfo:
    """A target module: its name in the model and its shape as LoRA sees it."""

    name: str
    in_features: int
    out_features: int
    conv1d: bool


def import_transformers() -> ModuleType:
    """transformers, or an InputError saying how to install it."""
    try:
        return importlib.import_module("transformers")
    except ImportError as e:
        raise InputError("OSRM runs the base model with Hugging Face transformers, which is not installed; "
                         "`pip install transformers` (and `pip install accelerate` for --max-memory offload)") from e


def _model_classes(transformers: ModuleType, backbone: bool) -> tuple[Any, ...]:
    # The class decides the module names an adapter trained on it carries: a causal LM's
    # "model.layers.0…" versus a bare backbone's "layers.0…".
    if backbone:
        return (transformers.AutoModel,)
    return transformers.AutoModelForCausalLM, transformers.AutoModel


def meta_model(base: Path, backbone: bool = False) -> nn.Module:
    """The base model's module tree on the meta device: names and shapes, no weights read.

    ``backbone``: the bare ``AutoModel`` (no LM head) instead of ``AutoModelForCausalLM``.
    """
    transformers = import_transformers()
    try:
        config = transformers.AutoConfig.from_pretrained(str(base))
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read the model config of {str(base)!r}: {e}") from e
    last: Exception | None = None
    for cls in _model_classes(transformers, backbone):
        try:
            with torch.device("meta"):
                return cls.from_config(config)
        except ValueError as e:  # config not mapped to this auto class
            last = e
    raise InputError(f"transformers cannot build a model for {str(base)!r} ({last})")


def _info(name: str, module: nn.Module) -> ModuleInfo | None:
    if isinstance(module, nn.Linear):
        return ModuleInfo(name, module.in_features, module.out_features, conv1d=False)
    if type(module).__name__ == _CONV1D and getattr(module, "weight", None) is not None:
        d_in, d_out = module.weight.shape
        return ModuleInfo(name, int(d_in), int(d_out), conv1d=True)
    return None


def resolve_target_modules(model: nn.Module, targets: Sequence[str]) -> list[ModuleInfo]:
    """The modules PEFT would adapt for ``target_modules=targets``, in model order.

    PEFT's rule: a module matches a target when its name equals it or ends with ``"." + target``;
    ``"all-linear"`` means every linear layer except the output head.

    Raises:
        InputError: nothing matches, or a match is not a linear layer.
    """
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    found: list[ModuleInfo] = []
    refused: list[str] = []
    for name, module in model.named_modules():
        if not name:
            continue
        if ALL_LINEAR in targets:
            match = module is not output and _info(name, module) is not None
        else:
            match = any(name == t or name.endswith("." + t) for t in targets)
        if not match:
            continue
        info = _info(name, module)
        if info is None:
            refused.append(f"{name} ({type(module).__name__})")
        else:
            found.append(info)
    if refused:
        raise InputError(f"OSRM initialises LoRA on linear layers only; target modules {list(targets)} also match "
                         f"{refused[:5]}{' …' if len(refused) > 5 else ''}; name the linear layers more precisely")
    if not found:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if _info(n, m) is not None})
        raise InputError(f"no module of the base model matches target modules {list(targets)}; "
                         f"its linear layers are named {linear}")
    if len({f.conv1d for f in found}) > 1:
        raise InputError("the target modules mix nn.Linear and Conv1D layers; PEFT's fan_in_fan_out cannot serve "
                         "both in one adapter: target one kind")
    return found


def modules_by_name(model: nn.Module, names: Iterable[str]) -> list[ModuleInfo]:
    """``ModuleInfo`` for named modules (from an existing adapter); refuses non-linear ones."""
    table = dict(model.named_modules())
    out = []
    for name in names:
        info = _info(name, table[name]) if name in table else None
        if info is None:
            raise InputError(f"module {name!r} is not a linear layer of the base model")
        out.append(info)
    return out


def parse_max_memory(spec: str) -> dict[int | str, str]:
    """``"cuda=20GiB,cpu=60GiB"`` / ``"0=20GiB,cpu=60GiB"`` → accelerate's ``max_memory``."""
    out: dict[int | str, str] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        key, sep, value = part.partition("=")
        if not sep or not value:
            raise InputError(f"--max-memory entry {part!r} must look like DEVICE=SIZE, e.g. cuda=20GiB or cpu=60GiB")
        key = key.strip().lower()
        if key in ("cuda", "gpu"):
            key = "0"
        if key.startswith("cuda:"):
            key = key[5:]
        out[int(key) if key.isdigit() else key] = value.strip()
    if not out:
        raise InputError(f"--max-memory {spec!r} names no device")
    return out


def load_model(base: Path, device: torch.device, dtype: torch.dtype,
               max_memory: Mapping[int | str, str] | None = None, offload_dir: Path | None = None,
               backbone: bool = False) -> nn.Module:
    """The base model in eval mode, on ``device`` or spread by accelerate under ``max_memory``."""
    transformers = import_transformers()
    kwargs: dict[str, Any] = {"dtype": dtype}
    if max_memory is not None:
        try:
            importlib.import_module("accelerate")
        except ImportError as e:
            raise InputError("--max-memory uses accelerate's big-model inference, which is not installed; "
                             "`pip install accelerate`") from e
        kwargs.update(device_map="auto", max_memory=dict(max_memory))
        if offload_dir is not None:
            Path(offload_dir).mkdir(parents=True, exist_ok=True)
            kwargs["offload_folder"] = str(offload_dir)
    last: Exception | None = None
    for cls in _model_classes(transformers, backbone):
        try:
            model = cls.from_pretrained(str(base), **kwargs)
            break
        except ValueError as e:
            last = e
    else:
        raise InputError(f"transformers cannot load the model in {str(base)!r} ({last})")
    if max_memory is None:
        model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model


def load_tokenizer(base: Path) -> Any | None:
    """The model directory's tokenizer, or None when it has none."""
    transformers = import_transformers()
    try:
        return transformers.AutoTokenizer.from_pretrained(str(base))
    except (OSError, ValueError, TypeError):
        return None


def _input_device(model: nn.Module) -> torch.device:
    device_map = getattr(model, "hf_device_map", None)
    if device_map:
        gpus = sorted(d for d in device_map.values() if isinstance(d, int))
        if gpus:
            return torch.device("cuda", gpus[0])
        return torch.device("cpu")
    return next(model.parameters()).device


class _StatsHooks:
    """Forward pre-hooks summing each module's non-padding inputs; use as a context manager."""

    def __init__(self, model: nn.Module, modules: Sequence[str], second_moments: bool,
                 stats_device: torch.device | None) -> None:
        self.second_moments = second_moments
        self.stats_device = stats_device
        self.stats: dict[str, ModuleStats] = {}
        self.mask: torch.Tensor | None = None
        self._masks: dict[torch.device, torch.Tensor] = {}
        table = dict(model.named_modules())
        self._handles = [table[name].register_forward_pre_hook(self._hook(name), with_kwargs=True)
                         for name in modules]

    def set_mask(self, mask: torch.Tensor) -> None:
        self.mask = mask.bool()
        self._masks = {}

    def _mask_on(self, device: torch.device) -> torch.Tensor:
        assert self.mask is not None
        if device not in self._masks:
            self._masks[device] = self.mask.to(device).reshape(-1)
        return self._masks[device]

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            x = args[0] if args else next(iter(kwargs.values()))
            d = x.shape[-1]
            tokens = x.shape[:-1].numel()
            if self.mask is None or tokens != self.mask.numel():
                raise InputError(
                    f"module {name!r} received inputs of shape {tuple(x.shape)}, which do not line up with the "
                    f"batch's {tuple(self.mask.shape) if self.mask is not None else '?'} tokens; OSRM statistics "
                    "need modules that see one input vector per token")
            rows = x.detach().reshape(tokens, d)[self._mask_on(x.device)].double()
            target = self.stats_device or x.device
            s = self.stats.get(name)
            if s is None:
                s = ModuleStats(count=0, sum_x=torch.zeros(d, dtype=torch.float64, device=target),
                                sum_xxT=torch.zeros(d, d, dtype=torch.float64, device=target)
                                if self.second_moments else None)
                self.stats[name] = s
            s.count += rows.shape[0]
            s.sum_x += rows.sum(0).to(target)
            if s.sum_xxT is not None:
                s.sum_xxT += (rows.T @ rows).to(target)
        return hook

    def __enter__(self) -> _StatsHooks:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for handle in self._handles:
            handle.remove()


def _runner(model: nn.Module, modules: Sequence[str]) -> nn.Module:
    """The backbone when every target lives in it (skips the LM head's logits), else the model."""
    backbone = getattr(model, "base_model", model)
    if backbone is model or getattr(model, "hf_device_map", None):
        return model
    inside = {id(m) for m in backbone.modules()}
    table = dict(model.named_modules())
    return backbone if all(id(table[n]) in inside for n in modules) else model


def collect_task_stats(model: nn.Module, modules: Sequence[str],
                       batches: Iterable[tuple[torch.Tensor, torch.Tensor]], second_moments: bool = True,
                       stats_device: torch.device | None = None) -> tuple[dict[str, ModuleStats], int]:
    """Sum the inputs of ``modules`` over ``batches`` (padding excluded).

    Returns:
        (module name → statistics, number of forward passes run).
    """
    device = _input_device(model)
    runner = _runner(model, modules)
    passes = 0
    with _StatsHooks(model, modules, second_moments, stats_device) as hooks, torch.inference_mode():
        for input_ids, mask in batches:
            hooks.set_mask(mask)
            try:
                runner(input_ids=input_ids.to(device), attention_mask=mask.to(device), use_cache=False)
            except torch.cuda.OutOfMemoryError as e:
                raise StreamMergeError(f"the device ran out of memory running the base model ({e}); lower --batch-size "
                                  "or --max-length, or give --max-memory to offload layers") from e
            passes += 1
    missing = [n for n in modules if n not in hooks.stats]
    if missing:
        raise InputError(f"modules {missing[:5]} never ran during the forward pass; they cannot be OSRM targets")
    return hooks.stats, passes
