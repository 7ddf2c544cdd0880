"""Planning: turn a recipe into plain data the engine executes, and find every problem first.

The plan says, for every output tensor, which base tensor it is read from and which
inputs change it (and how); how tensors are grouped into output shards; and what the job
will cost in memory and disk.  It reads only headers and configs, never tensor data, and
collects all problems before raising one ``PlanError`` that lists them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from ..errors import InputError, PlanError, StreamMergeError
from ..inputs.base_formats import SAFETENSORS, base_format_of
from ..inputs.chat_template import recipe_chat_template
from ..inputs.hub import Source, resolve_recipe_sources
from ..inputs.kinds import KINDS
from ..inputs.lora import load_lora_adapter
from ..inputs.peft_config import DORA_FEATURE, TARGET_PARAMETERS_FEATURE
from ..io.dtypes import DTYPE_ALIASES, DTYPES, FLOAT_DTYPE_NAMES
from ..io.fp8 import QUANTIZATION_CONFIG_KEY, Fp8Format
from ..io.reader import CheckpointLayout, open_checkpoint
from ..methods import MergeMethod, get_method
from ..methods.base import ALL_WEIGHTS
from ..recipe import Recipe, Weight
from .budget import budget_problems, estimate_memory
from .contributions import BASE_ITSELF, LM_HEAD, ContributionPlanner, filter_problems, same_path
from .fp8_plan import FP8_OUTPUT, fp8_layout, fp8_output_problems, fp8_tensor_order
from .tensor_jobs import TensorJob

# The output dtype of an FP8 base's weights unless --dtype says otherwise.
FP8_DEFAULT_OUTPUT = "BF16"


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
    planner = ContributionPlanner(recipe, base, base_config)
    planner.fp8_scales = fp8_scales
    planner.base_format = base_format
    summaries = []
    for index, (spec, source) in enumerate(zip(recipe.inputs, sources[1:])):
        if not source.local_path:
            continue  # its Hub problem is already reported
        try:
            if spec.kind == "model" and same_path(source.local_path, sources[0].local_path):
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
        problems += filter_problems(recipe, planner, {s.index for s in summaries if s.key_mapping != BASE_ITSELF})
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


def _tensor_jobs(base: CheckpointLayout, planner: ContributionPlanner, out_dtype: str | None) -> dict[str, TensorJob]:
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
