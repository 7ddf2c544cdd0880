"""Planning, input by input: which base tensors each adapter or fine-tune changes, and how (``Contribution``).

``ContributionPlanner`` checks every input against the base (shapes, dtypes, ranks, architecture family,
FP8 and GGUF limits) and records its contributions with the input's filters, per-tensor weights and
per-input parameters applied; what is wrong is collected in ``problems``, never raised one by one.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..inputs.base_formats import SAFETENSORS, BaseFormat, read_config
from ..inputs.kinds import DORA, EXPERT_LORA, FULL, LORA
from ..inputs.lora import LoraAdapter
from ..inputs.moe import parse_expert_loras
from ..io.dtypes import FLOAT_DTYPE_NAMES
from ..io.reader import CheckpointLayout
from ..names import LAYER_INDEX_PATTERN, NUM_LAYERS_KEYS, TOKEN_EMBEDDING_SUFFIXES
from ..recipe import Recipe
from .tensor_jobs import Contribution


LM_HEAD = "lm_head.weight"


def family_of(architecture: str | None) -> str | None:
    if not architecture:
        return None
    return re.sub(r"(For[A-Z]\w*|Model)$", "", architecture) or None


class ContributionPlanner:
    """Collects contributions and problems input by input."""

    def __init__(self, recipe: Recipe, base: CheckpointLayout, base_config: dict[str, Any]) -> None:
        self.recipe = recipe
        self.base = base
        self.base_config = base_config
        self.problems: list[str] = []
        self.contributions: dict[str, list[Contribution]] = {}
        self.virtual_sources: dict[str, str] = {}
        embed = next((n for n in base.shard_of if n.endswith(TOKEN_EMBEDDING_SUFFIXES)), None)
        if LM_HEAD not in base.shard_of and embed is not None:
            # Tied embeddings: lm_head is not stored. An adapter that changes lm_head unties it.
            self.virtual_sources[LM_HEAD] = embed
        self.names = set(base.shard_of) | set(self.virtual_sources)
        self.base_family = family_of((base_config.get("architectures") or [None])[0])
        self.num_layers = count_layers(base_config, self.names)
        self.fp8_scales: dict[str, str] = {}
        """An FP8 base's ``{weight: weight_scale_inv}``."""
        self.base_format: BaseFormat = SAFETENSORS

    def base_shape(self, name: str) -> tuple[int, ...]:
        return self.base.info(self.virtual_sources.get(name, name)).shape

    def add(self, target: str, contribution: Contribution) -> None:
        """Record a contribution, with the input's filters and per-tensor weight applied.

        A weight of exactly 0 leaves the tensor out for that input (as if it did not touch it).
        """
        spec = self.recipe.inputs[contribution.input_index]
        if not spec.selects(target):
            return
        weight = spec.weight_for(target, layer_index(target), self.num_layers)
        if weight == 0.0:
            return
        params = spec.params_for(target, layer_index(target), self.num_layers)
        self.contributions.setdefault(target, []).append(replace(contribution, weight=weight, params=params))

    def all_weights(self, target: str) -> tuple[float, ...]:
        """Every input's weight on ``target`` in input order, also of inputs that leave it unchanged
        (``normalize: total``; an input whose filters exclude ``target`` adds nothing)."""
        return tuple(s.weight_for(target, layer_index(target), self.num_layers)
                     for s in self.recipe.inputs if s.selects(target))

    def checkfamily_of(self, where: str, architecture: str | None) -> None:
        family = family_of(architecture)
        related = {family_of(a) for a in self.base_format.related_architectures.get(
            (self.base_config.get("architectures") or [""])[0], ())}
        if family and self.base_family and family != self.base_family and family not in related:
            self.problems.append(
                f"{where} was made for a {architecture} model but the base is a "
                f"{self.base_config['architectures'][0]}")

    def add_adapter(self, index: int, adapter: LoraAdapter) -> tuple[int, ...]:
        where = f"adapter {str(adapter.root)!r}"
        self.checkfamily_of(where, adapter.settings.base_model_class)
        header = adapter.header
        file = str(adapter.weights.shards[0])
        ranks = []
        for m in adapter.modules:
            a, b = header.tensors[m.a_key], header.tensors[m.b_key]
            bad = [t for t in (a, b) if t.dtype not in FLOAT_DTYPE_NAMES]
            if bad:
                self.problems.append(f"{where}: {bad[0].name!r} has dtype {bad[0].dtype}; LoRA factors must be floating point")
                continue
            if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != b.shape[1]:
                self.problems.append(f"{where}: {m.a_key!r} {list(a.shape)} and {m.b_key!r} {list(b.shape)} "
                                     "are not LoRA factors A [r, d_in] and B [d_out, r] of one rank")
                continue
            if a.shape[0] != m.rank:
                self.problems.append(f"{where}: module {m.module!r} has rank {a.shape[0]} in its weights but "
                                     f"{m.rank} in adapter_config.json (r / rank_pattern)")
                continue
            canonical = (b.shape[0], a.shape[1])
            expected = canonical[::-1] if m.transposed else canonical
            if self.base_shape(m.target) != expected:
                self.problems.append(
                    f"{where}: module {m.module!r} gives an update of shape {list(expected)} but base tensor "
                    f"{m.target!r} has shape {list(self.base_shape(m.target))}")
                continue
            if m.magnitude_key is not None and header.tensors[m.magnitude_key].shape != (canonical[0],):
                self.problems.append(f"{where}: DoRA magnitude {m.magnitude_key!r} has shape "
                                     f"{list(header.tensors[m.magnitude_key].shape)}, expected [{canonical[0]}]")
                continue
            ranks.append(m.rank)
            if m.magnitude_key is None:
                self.add(m.target, Contribution(index, LORA.name, file, (m.a_key, m.b_key), m.scale, m.transposed,
                                                rank=m.rank))
            else:
                self.add(m.target, Contribution(index, DORA.name, file, (m.a_key, m.b_key, m.magnitude_key), m.scale,
                                                m.transposed, rank=m.rank))
        ranks += self.add_expert_loras(index, adapter, where, file)
        for t in adapter.tensors:
            info = header.tensors[t.key]
            if info.shape != self.base_shape(t.target):
                self.problems.append(f"{where}: {t.key!r} has shape {list(info.shape)} but base tensor "
                                     f"{t.target!r} has shape {list(self.base_shape(t.target))}")
                continue
            self.add(t.target, Contribution(index, t.kind, file, (t.key,), t.scale))
        return tuple(sorted(set(ranks)))

    def add_expert_loras(self, index: int, adapter: LoraAdapter, where: str, file: str) -> list[int]:
        """PEFT ``target_parameters`` LoRAs on fused expert parameters, one contribution per expert matrix."""
        if not adapter.settings.target_parameters:
            return []
        base_infos = {n: self.base.info(n) for n in self.base.shard_of}
        loras = parse_expert_loras(adapter.header.tensors, adapter.settings, base_infos,
                                   self.base_config.get("model_type"), where, self.problems)
        ranks = []
        for lora in loras:
            for target in lora.targets:
                if target.expert is None:
                    self.problems.append(
                        f"{where}: {lora.module}.{lora.param} is stored fused ({target.name!r}, one [experts, …] "
                        "tensor, as gpt-oss ships it); merging LoRA into fused expert tensors is not supported yet "
                        "(checkpoints with one tensor per expert, e.g. Qwen3-MoE and Mixtral, are)")
                    continue
                ranks.append(lora.rank)
                self.add(target.name, Contribution(index, EXPERT_LORA.name, file, (lora.a_key, lora.b_key), lora.scale,
                                                   rank=lora.rank,
                                                   part=(target.expert, lora.num_experts, *target.rows)))
        return ranks

    def add_model(self, index: int, model: CheckpointLayout) -> int:
        where = f"model {str(model.root)!r}"
        config = read_config(model.root)
        self.checkfamily_of(where, (config.get("architectures") or [None])[0])
        if not self.base_format.exact_values:
            self.problems.append(f"{where}: full fine-tunes cannot be merged into a {self.base_format.name} base yet "
                                 "(its task vector would be taken against quantized weights); merge adapters, or use "
                                 "a safetensors base")
            return 0
        scale_names = set(self.fp8_scales.values())  # an FP8 base's scales: the fine-tune has none of its own
        quantized = sorted(n for n in self.fp8_scales if n in model.shard_of
                           and model.info(n).dtype not in FLOAT_DTYPE_NAMES)
        if quantized:
            self.problems.append(
                f"{where}: tensor {quantized[0]!r} (and {len(quantized) - 1} more) is {model.info(quantized[0]).dtype}; "
                "a full fine-tune merged into an FP8 base must be stored unquantized (bf16, fp16 or fp32), since its "
                "task vector is taken against the dequantized base weights: save it with "
                "save_pretrained in bfloat16 first")
            return 0
        missing = sorted(set(self.base.shard_of) - set(model.shard_of) - scale_names)
        extra = sorted(set(model.shard_of) - set(self.base.shard_of))
        if missing:
            self.problems.append(f"{where} lacks {len(missing)} base tensor(s), e.g. {missing[:3]}")
        if extra:
            self.problems.append(f"{where} has {len(extra)} tensor(s) the base lacks, e.g. {extra[:3]}")
        changed = 0
        for name in self.base.shard_of:
            if name not in model.shard_of or name in scale_names:
                continue
            info = model.info(name)
            if info.shape != self.base.info(name).shape:
                self.problems.append(f"{where}: tensor {name!r} has shape {list(info.shape)}, "
                                     f"the base has {list(self.base.info(name).shape)}")
                continue
            self.add(name, Contribution(index, FULL.name, str(model.shard_of[name]), (name,)))
            changed += 1
        return changed


def layer_index(name: str) -> int | None:
    """The transformer block a tensor belongs to, or None (embeddings, final norm, lm_head)."""
    match = _LAYER_INDEX.search(name)
    return int(match.group(1)) if match else None


def count_layers(config: dict[str, Any], names: Any) -> int:
    """The number of blocks: from config.json, else the highest block index in the tensor names."""
    for key in NUM_LAYERS_KEYS:
        if isinstance(config.get(key), int) and config[key] > 0:
            return int(config[key])
    indices = [i for i in map(layer_index, names) if i is not None]
    return max(indices) + 1 if indices else 0


_LAYER_INDEX = re.compile(LAYER_INDEX_PATTERN)


BASE_ITSELF = "the base itself: changes nothing, adds its weight to normalize: total"
"""How a plan describes a full-model input that is the base (mergekit lists it among the models)."""


def same_path(a: str, b: str) -> bool:
    return Path(a).resolve() == Path(b).resolve()


def filter_problems(recipe: Recipe, planner: ContributionPlanner, planned: set[int]) -> list[str]:
    """Patterns that match no base tensor (typos), and inputs the filters leave with nothing."""
    problems = []
    names = sorted(planner.names)
    for i, spec in enumerate(recipe.inputs):
        if i not in planned:
            continue
        patterns = [("include", p) for p in spec.include] + [("exclude", p) for p in spec.exclude]
        patterns += [(f"overrides[{j}].match", o.match) for j, o in enumerate(spec.overrides)]
        for field_name, pattern in patterns:
            if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                problems.append(f"inputs[{i}].{field_name}: pattern {pattern!r} matches no tensor of the base model "
                                f"(names look like {names[len(names) // 2]!r})")
        touched = any(c.input_index == i for cs in planner.contributions.values() for c in cs)
        if (spec.include or spec.exclude or spec.overrides or isinstance(spec.weight, tuple)) and not touched:
            problems.append(f"inputs[{i}] ({spec.path!r}): its filters and weights leave no tensor to merge")
    return problems
