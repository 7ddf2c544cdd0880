"""LoRA on fused mixture-of-experts parameters (PEFT ``target_parameters``): keys, layout and math.

PEFT wraps each targeted 3-D parameter ``[E, d1, d2]`` in a ``lora.ParamWrapper``
(``peft/tuners/lora/layer.py``) holding one ``lora_A`` ``[r·E, d_in]`` and one ``lora_B``
``[d_out, r·E]`` for all experts.  Expert ``e``'s factors are ``A_e = A[e·r:(e+1)·r]``
(expert-major rows) and ``B_e = B[:, e::E]`` (rank-major columns: ``B.reshape(d_out, r, E)``),
and its update is ``ΔW_e = s·B_e A_e`` with ``s = α/r`` (``α/√r`` with rsLoRA).  The
parameter is ``[E, d_out, d_in]`` (``d_out = d1``) unless the experts module says
``is_transposed`` (gpt-oss: ``[E, d_in, d_out]``, ``ΔW_e`` stored transposed).

Several targeted parameters of one module nest: the first in the module's definition order is
wrapped first, so its keys carry the most ``.base_layer`` parts
(``experts.base_layer.lora_A.weight`` = ``gate_up_proj``, ``experts.lora_A.weight`` =
``down_proj``).  On disk transformers writes most fused experts back per expert
(``experts.{e}.gate_proj.weight`` / ``up_proj`` stacked along ``d_out`` = ``gate_up_proj``;
Mixtral: ``block_sparse_moe.experts.{e}.w1/w3/w2``), so one expert's part is a plain rank-``r``
LoRA on a 2-D tensor: ``(s·B_e[rows], A_e)``.  gpt-oss keeps the fused 3-D tensor on disk; its
row blocks are expert ranges.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..io.header import TensorInfo
from .kinds import expert_factors
from .lora import PEFT_PREFIX, resolve_target
from .peft_config import LoraSettings

__all__ = [
    "EXPERT_PARAM_ORDER", "TRANSPOSED_EXPERT_MODELS", "ExpertTarget", "ExpertLora", "expert_factors",
    "expert_update_factors", "expert_part_factors", "fused_expert_delta", "parse_expert_loras",
]

EXPERT_PARAM_ORDER = ("gate_up_proj", "gate_proj", "up_proj", "down_proj")
"""Definition order of the fused expert parameters in transformers' expert modules (fixes the nesting)."""

TRANSPOSED_EXPERT_MODELS = frozenset({"gpt_oss", "aria", "openai_privacy_filter"})
"""``config.model_type`` values whose experts module sets ``is_transposed`` ([E, d_in, d_out])."""

# Per-expert on-disk tensors that stack (along d_out) into one fused parameter, per naming scheme.
_PER_EXPERT_PARTS: dict[str, tuple[tuple[str, ...], ...]] = {
    "gate_up_proj": (("gate_proj", "up_proj"), ("w1", "w3")),
    "gate_proj": (("gate_proj",), ("w1",)),
    "up_proj": (("up_proj",), ("w3",)),
    "down_proj": (("down_proj",), ("w2",)),
}
# transformers renames these module paths at load time (Mixtral); the checkpoint keeps the old one.
_MODULE_RENAMES = ((".mlp.experts", ".block_sparse_moe.experts"),)
_WRAPPER_KEY = re.compile(r"^(?P<module>.+?)(?P<nest>(?:\.base_layer)*)\.lora_(?P<part>A|B)\.weight$")


@dataclass(frozen=True)
class ExpertTarget:
    """Where (part of) a fused parameter's update lands in the base checkpoint.

    ``expert`` None: the tensor is the fused ``[E, d1, d2]`` parameter itself; otherwise it is
    expert ``expert``'s 2-D ``[rows[1]-rows[0], d_in]`` slice ``rows`` of the fused ``d_out``.
    """

    name: str
    expert: int | None
    rows: tuple[int, int]


@dataclass(frozen=True)
class ExpertLora:
    """One ``ParamWrapper``: factors of all experts of one fused parameter."""

    module: str
    param: str
    a_key: str
    b_key: str
    num_experts: int
    rank: int
    scale: float
    transposed: bool
    shape: tuple[int, int, int]
    targets: tuple[ExpertTarget, ...]


def expert_update_factors(lora: ExpertLora, a: torch.Tensor, b: torch.Tensor, expert: int,
                          rows: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(up, down)``, ``ΔW_e = up @ down`` in the canonical ``[d_out, d_in]``, scale folded.

    ``rows`` keeps a slice of ``d_out`` (one per-expert part of ``gate_up_proj``).  For a
    ``transposed`` parameter the stored slice ``[e]`` is ``(up @ down)ᵀ``.
    """
    down, up = expert_factors(a, b, lora.num_experts, expert)
    if rows is not None:
        up = up[rows[0]:rows[1]]
    return lora.scale * up, down


def expert_part_factors(lora: ExpertLora, a: torch.Tensor, b: torch.Tensor,
                        target: ExpertTarget) -> tuple[torch.Tensor, torch.Tensor]:
    """``expert_update_factors`` of a per-expert on-disk target (a plain 2-D LoRA on it)."""
    if target.expert is None:
        raise ValueError(f"{target.name!r} is a fused expert tensor; use fused_expert_delta or expert_update_factors")
    return expert_update_factors(lora, a, b, target.expert, target.rows)


def fused_expert_delta(a: torch.Tensor, b: torch.Tensor, scale: float, num_experts: int, start: int, stop: int,
                       transposed: bool) -> torch.Tensor:
    """``ΔW[start:stop]`` of a fused ``[E, d1, d2]`` parameter: experts ``start:stop`` (one row block)."""
    r = a.shape[0] // num_experts
    down = a.reshape(num_experts, r, a.shape[1])[start:stop]  # [n, r, d_in]
    up = b.reshape(b.shape[0], r, num_experts).permute(2, 0, 1)[start:stop]  # [n, d_out, r]
    delta = torch.bmm(up, down) * scale
    return delta.transpose(1, 2) if transposed else delta


def _spellings(module: str) -> list[str]:
    names = [module]
    for new, old in _MODULE_RENAMES:
        if module.endswith(new) or new + "." in module:
            names.append(module.replace(new, old))
    return names


def _base_layout(module: str, param: str, base: Mapping[str, TensorInfo],
                 transposed: bool) -> tuple[tuple[int, int, int], tuple[ExpertTarget, ...]] | str:
    """The fused shape and on-disk targets of ``module.param``, or why they cannot be found."""
    fused = resolve_target(f"{module}.{param}", base)
    if fused is not None:
        shape = base[fused].shape
        if len(shape) != 3:
            return f"{fused!r} has shape {list(shape)}; only 3-D [experts, ·, ·] parameters are merged per expert"
        return (shape[0], shape[1], shape[2]), (ExpertTarget(fused, None, (0, shape[1])),)
    if transposed:
        return (f"no fused tensor {module + '.' + param!r} in the base, and per-expert tensors of a transposed "
                "experts module are not supported")
    for spelling in _spellings(module):
        for parts in _PER_EXPERT_PARTS.get(param, ()):
            targets: list[ExpertTarget] = []
            expert, cols = 0, None
            while True:
                names = [resolve_target(f"{spelling}.{expert}.{p}.weight", base) for p in parts]
                if any(n is None for n in names):
                    break
                row = 0
                for name in names:
                    rows, width = base[name].shape  # type: ignore[index]
                    if cols not in (None, width):
                        return f"{name!r} has {width} columns where its siblings have {cols}"
                    cols = width
                    targets.append(ExpertTarget(name, expert, (row, row + rows)))  # type: ignore[arg-type]
                    row += rows
                expert += 1
            if targets:
                d_out = sum(t.rows[1] - t.rows[0] for t in targets if t.expert == 0)
                return (expert, d_out, cols or 0), tuple(targets)
    return f"neither {module + '.' + param!r} nor per-expert tensors for it are in the base"


def _wrappers(adapter: Mapping[str, TensorInfo], settings: LoraSettings,
              base: Mapping[str, TensorInfo]) -> dict[str, dict[int, dict[str, str]]]:
    found: dict[str, dict[int, dict[str, str]]] = {}
    for key in adapter:
        name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        match = _WRAPPER_KEY.match(name)
        if match is None or not settings.targeted_parameters(match["module"]):
            continue
        if not match["nest"] and resolve_target(match["module"] + ".weight", base) is not None:
            continue  # target_parameters on a Linear's own weight: plain LoRA, read by inputs.lora
        depth = match["nest"].count(".base_layer")
        found.setdefault(match["module"], {}).setdefault(depth, {})[match["part"]] = key
    return found


def parse_expert_loras(adapter: Mapping[str, TensorInfo], settings: LoraSettings, base: Mapping[str, TensorInfo],
                       model_type: str | None, where: str, problems: list[str]) -> tuple[ExpertLora, ...]:
    """Every ``ParamWrapper`` of an adapter, resolved against the base; mismatches go to ``problems``.

    Args:
        adapter: the adapter file's tensors (header only).
        settings: its parsed ``adapter_config.json`` (``target_parameters`` accepted).
        base: the base checkpoint's tensors (header only).
        model_type: the base ``config.json`` ``model_type`` (decides ``is_transposed``).
        where: names the adapter in messages.
        problems: receives every mismatch.
    """
    transposed = model_type in TRANSPOSED_EXPERT_MODELS
    loras: list[ExpertLora] = []
    for module, by_depth in _wrappers(adapter, settings, base).items():
        targeted = settings.targeted_parameters(module)
        unknown = [p for p in targeted if p not in EXPERT_PARAM_ORDER and resolve_target(f"{module}.{p}", base)]
        present = [p for p in EXPERT_PARAM_ORDER if p in targeted and not isinstance(
            _base_layout(module, p, base, transposed), str)]
        if unknown or len(present) != len(by_depth) or set(by_depth) != set(range(len(by_depth))):
            problems.append(
                f"{where}: module {module!r} has {len(by_depth)} target_parameters wrapper(s) but the base has "
                f"{present} of the targeted parameters {list(targeted)}" + (
                    f"; {unknown} are not known fused expert parameters ({list(EXPERT_PARAM_ORDER)}), so their "
                    "nesting order is unknown" if unknown else ""))
            continue
        for depth, keys in sorted(by_depth.items()):
            param = present[len(present) - 1 - depth]  # the first-wrapped parameter is nested deepest
            if set(keys) != {"A", "B"}:
                problems.append(f"{where}: {module}.{param} has only lora_{''.join(keys)} of its two factors")
                continue
            layout = _base_layout(module, param, base, transposed)
            assert not isinstance(layout, str)
            shape, targets = layout
            experts, d1, d2 = shape
            a_shape, b_shape = adapter[keys["A"]].shape, adapter[keys["B"]].shape
            r = a_shape[0] // experts if experts else 0
            d_out, d_in = (d2, d1) if transposed else (d1, d2)
            config_r, _ = settings.rank_and_alpha(f"{module}.{param}")
            if tuple(a_shape) != (r * experts, d_in) or tuple(b_shape) != (d_out, r * experts) or r != config_r:
                problems.append(
                    f"{where}: {module}.{param} factors lora_A {list(a_shape)} / lora_B {list(b_shape)} do not fit "
                    f"{experts} experts of [{d_out}, {d_in}] at rank r={config_r} (expected "
                    f"[{config_r * experts}, {d_in}] / [{d_out}, {config_r * experts}])")
                continue
            loras.append(ExpertLora(module=module, param=param, a_key=keys["A"], b_key=keys["B"], num_experts=experts,
                                    rank=r, scale=settings.scaling(f"{module}.{param}"), transposed=transposed,
                                    shape=shape, targets=targets))
    return tuple(loras)
