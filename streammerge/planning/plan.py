"""Planning: turn a recipe into plain data the engine executes, and find every problem first.

The plan says, for every output tensor, which base tensor it is read from and which
inputs change it (and how); how tensors are grouped into output shards; and what the job
will cost in memory and disk.  It reads only headers and configs, never tensor data, and
collects all problems before raising one ``PlanError`` that lists them.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from ..inputs.base_formats import SAFETENSORS, BaseFormat, base_format_of, read_config
from ..inputs.kinds import DORA, EXPERT_LORA, FULL, KINDS, LORA
from ..inputs.moe import parse_expert_loras
from ..inputs.peft_config import DORA_FEATURE, TARGET_PARAMETERS_FEATURE
from ..io.fp8 import QUANTIZATION_CONFIG_KEY, Fp8Format
from ..inputs.lora import LoraAdapter, load_lora_adapter
from .budget import budget_problems, estimate_memory
from .fp8_plan import FP8_OUTPUT, fp8_layout, fp8_output_problems, fp8_tensor_order
from ..errors import InputError, PlanError, StreamMergeError
from ..inputs.hub import Source, resolve_recipe_sources
from ..io.dtypes import DTYPE_ALIASES, DTYPES, FLOAT_DTYPE_NAMES, byte_size
from ..io.reader import CheckpointLayout, open_checkpoint
from ..methods import MergeMethod, get_method
from ..methods.base import ALL_WEIGHTS
from ..inputs.chat_template import recipe_chat_template
from ..names import LAYER_INDEX_PATTERN, NUM_LAYERS_KEYS, TOKEN_EMBEDDING_SUFFIXES
from ..recipe import Recipe, Weight

LM_HEAD = "lm_head.weight"
# The output dtype of an FP8 base's weights unless --dtype says otherwise.
FP8_DEFAULT_OUTPUT = "BF16"


@dataclass(frozen=True)
class Contribution:
    """How one input changes one output tensor.

    Attributes:
        input_index: position of the input in the recipe.
        kind: the input kind, a key of ``inputs.kinds.KINDS`` (what ``keys`` are and how they
            become a task update).
        file: the safetensors file holding ``keys``.
        keys: tensor names inside ``file``.
        scale: LoRA scaling s (folded into B), 1 otherwise.
        transposed: the stored tensor is (B A)ᵀ (fan_in_fan_out or embedding LoRA).
        weight: the input's user weight w_i on this tensor (per-layer / per-module recipe weights).
        rank: the LoRA rank r (0 for dense contributions); sizes the memory estimate.
    """

    input_index: int
    kind: str
    file: str
    keys: tuple[str, ...]
    scale: float = 1.0
    transposed: bool = False
    weight: float = 1.0
    rank: int = 0
    part: tuple[int, ...] = ()
    """Kind-specific integers (``expert_lora``: expert, experts, first and end row of the fused d_out)."""
    params: tuple[tuple[str, float], ...] = ()
    """The input's own per-input method parameters on this tensor (``InputSpec.params_for``)."""


@dataclass(frozen=True)
class TensorJob:
    """One output tensor: read ``source`` from the base, apply contributions, cast, write."""

    name: str
    source: str
    source_file: str
    dtype: str
    out_dtype: str
    shape: tuple[int, ...]
    contributions: tuple[Contribution, ...] = ()
    scale: str = ""
    """An FP8 base weight's ``weight_scale_inv`` tensor (the worker dequantizes ``source`` with it)."""
    scale_file: str = ""
    scale_of: str = ""
    """FP8 output: this tensor is the fresh ``weight_scale_inv`` of merged FP8 weight ``scale_of``, computed
    while that weight is requantized and written right after it in the same shard."""
    params: tuple[tuple[str, Any], ...] = ()
    """Method parameters of this tensor only (``normalize: total``'s ``all_weights``)."""

    @property
    def is_copy(self) -> bool:
        """Untouched and not cast: copied byte for byte."""
        return (not self.contributions and not self.scale_of and self.dtype == self.out_dtype
                and self.source == self.name)

    @property
    def out_bytes(self) -> int:
        return byte_size(self.out_dtype, self.shape)


@dataclass(frozen=True)
class InputSummary:
    """What the plan found in one input."""

    index: int
    kind: str
    path: str
    weight: Weight
    fingerprint: str
    tensors_changed: int
    ranks: tuple[int, ...] = ()
    bytes_read: int = 0
    key_mapping: str = ""
    """How its tensor names were mapped onto the base's ('' when they match as they are)."""


@dataclass(frozen=True)
class MergePlan:
    """Plain data: everything the engine needs, printable and hashable."""

    recipe: Recipe
    method_params: tuple[tuple[str, Any], ...]
    base_fingerprint: str
    inputs: tuple[InputSummary, ...]
    tensors: tuple[TensorJob, ...]
    """Every output tensor, in the base's order (virtual tensors such as an untied lm_head last)."""
    base_files: tuple[str, ...]
    """The base's weight file names, in order (sinks may keep its layout)."""
    base_indexed: bool
    """The base has a ``model.safetensors.index.json``."""
    config_updates: tuple[tuple[str, Any], ...]
    estimated_peak_bytes: int
    config_drops: tuple[str, ...] = ()
    """``config.json`` keys the output leaves out (an FP8 base's ``quantization_config`` for a bf16 output)."""
    fp8: Fp8Format | None = None
    chat_template: str | None = None
    """The chat template the output's tokenizer files get (the recipe's ``chat_template`` resolved); None: unchanged."""
    """The base's block-scaled FP8 format, when it is an FP8 checkpoint."""
    sources: tuple[Source, ...] = ()
    """Where the base (first) and each input were read from: local paths and Hub snapshots."""
    base_format: str = SAFETENSORS.name
    """The base's format, a key of ``inputs.base_formats.BASE_FORMATS`` (safetensors, gguf)."""

    @property
    def base_dir(self) -> str:
        """The local directory (or file) the base model is read from."""
        return self.sources[0].local_path if self.sources else self.recipe.base

    def resolved_recipe(self) -> Recipe:
        """The recipe as run: every method parameter spelled out, Hub revisions pinned to commits."""
        recipe = replace(self.recipe, params=self.method_params)
        if len(self.sources) != len(recipe.inputs) + 1:
            return recipe
        base, *inputs = self.sources
        return replace(
            recipe, revision=base.commit or recipe.revision,
            inputs=tuple(replace(spec, revision=src.commit or spec.revision)
                         for spec, src in zip(recipe.inputs, inputs)))

    @property
    def tensor_count(self) -> int:
        return len(self.tensors)

    @property
    def merged_count(self) -> int:
        return sum(1 for t in self.tensors if t.contributions)

    def fingerprint(self) -> str:
        """SHA-256 of the plan's content: guards a resumed job against changed recipes or inputs."""
        doc = asdict(self)
        doc["recipe"] = self.recipe.fingerprint()  # without how-to-run fields (device, limits, out)
        return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def tensor_seed(seed: int, name: str) -> int:
    """The per-tensor random seed: a resumed or re-run job draws the same numbers."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def resolve_dtype(name: str | None) -> str | None:
    """Map a user dtype spelling to a safetensors dtype name (None keeps base dtypes)."""
    if name is None:
        return None
    key = DTYPE_ALIASES.get(name.lower(), name.upper())
    if key not in FLOAT_DTYPE_NAMES and key != FP8_OUTPUT:
        raise InputError(f"unknown output dtype {name!r}; use bfloat16, float16 or float32 "
                         "(or float8_e4m3fn for a block-scaled FP8 base)")
    return key


def layout_fingerprint(layout: CheckpointLayout) -> str:
    """A cheap identity of a checkpoint: each shard's name, size and header hash."""
    h = hashlib.sha256()
    for shard in layout.shards:
        header = layout.headers[shard]
        h.update(f"{shard.name}:{header.file_size}:{header.header_sha256}\n".encode())
    return h.hexdigest()


def _family(architecture: str | None) -> str | None:
    if not architecture:
        return None
    return re.sub(r"(For[A-Z]\w*|Model)$", "", architecture) or None


class _Planner:
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
        self.base_family = _family((base_config.get("architectures") or [None])[0])
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

    def check_family(self, where: str, architecture: str | None) -> None:
        family = _family(architecture)
        related = {_family(a) for a in self.base_format.related_architectures.get(
            (self.base_config.get("architectures") or [""])[0], ())}
        if family and self.base_family and family != self.base_family and family not in related:
            self.problems.append(
                f"{where} was made for a {architecture} model but the base is a "
                f"{self.base_config['architectures'][0]}")

    def add_adapter(self, index: int, adapter: LoraAdapter) -> tuple[int, ...]:
        where = f"adapter {str(adapter.root)!r}"
        self.check_family(where, adapter.settings.base_model_class)
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
        self.check_family(where, (config.get("architectures") or [None])[0])
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


def _same_path(a: str, b: str) -> bool:
    return Path(a).resolve() == Path(b).resolve()


def _filter_problems(recipe: Recipe, planner: _Planner, planned: set[int]) -> list[str]:
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


def plan_merge(recipe: Recipe, *, allow_pickle: bool = False) -> MergePlan:
    """Validate a recipe against its files and produce the plan (the output format's own checks are the sink's).

    Hub repo ids are resolved to local snapshots first (``hub.py``).

    Args:
        recipe: the job.
        allow_pickle: read pickle-only adapters (``adapter_model.bin``) with
            ``torch.load(weights_only=True)``; refused unread otherwise.  Deliberately not a
            recipe field: a recipe file from elsewhere must not be able to switch it on.

    Raises:
        PlanError: listing every problem found.
    """
    problems = recipe.validate()
    method: MergeMethod | None = None
    method_params: dict[str, Any] = {}
    try:
        method = get_method(recipe.method)
        method_params = method.resolve_params(dict(recipe.given_params()))
    except StreamMergeError:
        method = None  # recipe.validate() reported it
    try:
        out_dtype = resolve_dtype(recipe.dtype)
    except InputError as e:
        problems.append(f"dtype: {e}")
        out_dtype = None
    sources = resolve_recipe_sources(recipe, problems)
    if not sources[0].local_path:
        raise PlanError(problems)
    try:
        base_format = base_format_of(sources[0].local_path)
        base = base_format.open(Path(sources[0].local_path))
        base_config = base_format.config(base)
    except StreamMergeError as e:
        raise PlanError([*problems, f"base model: {e}"]) from e
    if base_format.output_formats is not None and recipe.output_format not in base_format.output_formats:
        problems.append(f"output_format: {recipe.output_format!r} cannot be written from a {base_format.name} base "
                        f"yet; use one of {sorted(base_format.output_formats)}")
    fp8, fp8_scales = fp8_layout(base, base_config, problems)
    problems += fp8_output_problems(fp8, out_dtype, recipe.output_format, str(base.root))
    requantize = fp8 is not None and out_dtype == FP8_OUTPUT
    planner = _Planner(recipe, base, base_config)
    planner.fp8_scales = fp8_scales
    planner.base_format = base_format
    summaries = []
    for index, (spec, source) in enumerate(zip(recipe.inputs, sources[1:])):
        if not source.local_path:
            continue  # its Hub problem is already reported
        try:
            if spec.kind == "model" and _same_path(source.local_path, sources[0].local_path):
                layout, ranks, mapping = base, (), BASE_ITSELF
            elif spec.kind == "adapter":
                adapter = load_lora_adapter(source.local_path, planner.names, planner.problems, allow_pickle,
                                            recipe.skip_missing, accept=(DORA_FEATURE, TARGET_PARAMETERS_FEATURE))
                ranks = planner.add_adapter(index, adapter)
                layout = adapter.weights
                mapping = adapter.key_mapping.describe()
                if adapter.skipped:
                    mapping = "; ".join(filter(None, [mapping, f"left out (no base tensor): {list(adapter.skipped)}"]))
            else:
                layout = open_checkpoint(source.local_path)
                ranks = ()
                mapping = ""
                planner.add_model(index, layout)
        except StreamMergeError as e:
            planner.problems.append(str(e))
            continue
        mine = [c for cs in planner.contributions.values() for c in cs if c.input_index == index]
        changed = sum(1 for cs in planner.contributions.values() if any(c.input_index == index for c in cs))
        read = sum(layout.headers[Path(c.file)].tensors[k].nbytes for c in mine for k in c.keys)
        summaries.append(InputSummary(index, spec.kind, spec.path, spec.weight, layout_fingerprint(layout),
                                      changed, ranks, read, mapping))
    problems += planner.problems
    if not planner.problems:
        problems += _filter_problems(recipe, planner, {s.index for s in summaries if s.key_mapping != BASE_ITSELF})
    for target, contribs in planner.contributions.items():
        if len({c.transposed for c in contribs if KINDS[c.kind].low_rank}) > 1:
            problems.append(f"inputs disagree on the orientation of {target!r} (fan_in_fan_out differs)")
    if problems:
        raise PlanError(problems)
    assert method is not None

    template = recipe_chat_template(recipe, sources, problems)
    if problems:
        raise PlanError(problems)
    jobs = _tensor_jobs(base, planner, out_dtype)
    if method_params.get("normalize") == "total":
        jobs = {name: replace(job, params=((ALL_WEIGHTS, planner.all_weights(name)),)) if job.contributions
                else job for name, job in jobs.items()}
    config_updates: dict[str, Any] = {}
    if any(LM_HEAD == t.name and t.source != LM_HEAD for t in jobs.values()):
        config_updates["tie_word_embeddings"] = False
    if (out_dtype is not None or fp8 is not None or not base_format.keeps_file_layout) and not requantize:
        # transformers 4 reads torch_dtype, transformers 5 writes dtype: keep both right.
        matrices = [t.out_dtype for t in jobs.values() if len(t.shape) == 2] or ["F32"]
        main = out_dtype or (FP8_DEFAULT_OUTPUT if fp8 is not None else max(set(matrices), key=matrices.count))
        name = str(DTYPES[main].torch_dtype).removeprefix("torch.")
        config_updates["torch_dtype"] = name
        if "dtype" in base_config:
            config_updates["dtype"] = name
    memory = estimate_memory(jobs.values(), method, method_params)
    problems = budget_problems(memory, recipe.max_memory)
    if problems:
        raise PlanError(problems)
    plan = MergePlan(
        recipe=recipe,
        method_params=tuple(sorted(method_params.items())),
        base_fingerprint=layout_fingerprint(base),
        inputs=tuple(summaries),
        tensors=tuple(jobs.values()),
        base_files=tuple(shard.name for shard in base.shards),
        base_indexed=base.index_path is not None,
        config_updates=tuple(sorted(config_updates.items())),
        estimated_peak_bytes=memory.host_bytes,
        sources=sources,
        config_drops=(QUANTIZATION_CONFIG_KEY,) if fp8 is not None and not requantize else (),
        fp8=fp8,
        base_format=base_format.name,
        chat_template=template,
    )
    return plan


def _tensor_jobs(base: CheckpointLayout, planner: _Planner, out_dtype: str | None) -> dict[str, TensorJob]:
    """Every output tensor's job.  An FP8 base's scales are read with their weights and dropped (bf16 output), or,
    with ``--dtype float8_e4m3fn``, kept: copied beside an untouched weight, computed afresh after a merged one;
    every other tensor then keeps its dtype."""
    jobs: dict[str, TensorJob] = {}
    scales = planner.fp8_scales
    requantize = bool(scales) and out_dtype == FP8_OUTPUT
    names = fp8_tensor_order(list(base.shard_of), scales, requantize)
    names += [v for v in planner.virtual_sources if v in planner.contributions]
    weight_of = {s: w for w, s in scales.items()}
    for name in names:
        source = planner.virtual_sources.get(name, name)
        info = base.info(source)
        cast_to = info.dtype if requantize else planner.base_format.output_dtype(info.dtype, out_dtype)
        scale = scales.get(source, "")
        if scale and not requantize:
            cast_to = out_dtype or FP8_DEFAULT_OUTPUT
        contribs = tuple(sorted(planner.contributions.get(name, ()), key=lambda c: (c.input_index, c.kind)))
        scale_of = weight_of.get(name, "") if requantize else ""
        jobs[name] = TensorJob(name, source, str(base.shard_of[source]), info.dtype, cast_to, info.shape, contribs,
                               scale, str(base.shard_of[scale]) if scale else "",
                               scale_of if planner.contributions.get(scale_of) else "")
    return jobs
