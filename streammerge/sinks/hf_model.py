"""``--output-format model``: a Hugging Face model directory.

Units are safetensors shards: the base's own layout, or ``--max-shard-size`` buckets named
``model-0000k-of-0000n.safetensors`` (``model.safetensors`` when one suffices).  Each shard is
written tensor by tensor behind a background writer stage; the index, the config (with the
plan's updates) and the base's tokenizer / generation files are written once every shard is.
A GGUF base has no safetensors layout and no such files: its shards are ``--max-shard-size``
buckets (5 GB by default) and its config and tokenizer are rebuilt from the GGUF metadata
(``inputs.base_formats``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from ..errors import OutputError, StreamMergeError
from ..inputs.base_formats import BASE_FORMATS
from ..io.atomic import copy_file_atomic, write_bytes_atomic
from ..io.reader import open_checkpoint
from ..io.writer import ShardLayout, ShardWriter, layout_shard, write_index
from ..io.stage import OrderedStage
from ..jobs.faults import kill_point
from ..names import (CHAT_TEMPLATE_KEY, CHAT_TEMPLATE_NAME, CONFIG_NAME, INDEX_NAME, NOT_COPIED_NAMES, PARTIAL_SUFFIX,
                     SAFETENSORS_SUFFIX, SHARD_NAME_TEMPLATE, SINGLE_FILE_NAME, TOKENIZER_CONFIG_NAME,
                     WEIGHT_FILE_SUFFIXES)
from ..planning.budget import WRITE_QUEUE_DEPTH
from ..planning.describe import format_size
from ..planning.plan import MergePlan, TensorJob
from .base import CardFacts, OutputUnit, ProgressCallback, Sink, TensorSource, UnitResult, UnitTally

__all__ = ["HfModelSink", "model_files"]

# Shards of an output whose base has no safetensors layout to keep (a GGUF base): the Hub's usual size.
DEFAULT_SHARD_BYTES = 5 * 10**9
# Room the free-space check keeps for each file rebuilt from a GGUF base (its tokenizer is a few MB).
GENERATED_FILE_BYTES = 32 << 20


def _in_file_order(group: list[TensorJob]) -> tuple[TensorJob, ...]:
    """``save_file``'s order, except that fresh FP8 scales follow their weight (they are computed while it is
    written, so the writer cannot take them earlier)."""
    order = {slot.name: i for i, slot in enumerate(_layout(group).slots)}
    ordered = sorted(group, key=lambda t: order[t.name])
    fresh = {t.scale_of: t for t in ordered if t.scale_of}
    result: list[TensorJob] = []
    for job in ordered:
        if not job.scale_of:
            result.append(job)
            if job.name in fresh:
                result.append(fresh.pop(job.name))
    if fresh:
        raise OutputError(f"internal error: FP8 scale {next(iter(fresh.values())).name!r} is planned into a shard "
                          f"without its weight {next(iter(fresh))!r}")
    return tuple(result)


def _layout(tensors: tuple[TensorJob, ...] | list[TensorJob], keep_order: bool = False) -> ShardLayout:
    return layout_shard(((t.name, t.out_dtype, t.shape) for t in tensors), keep_order=keep_order)


def _unit(file_name: str, group: list[TensorJob]) -> OutputUnit:
    tensors = _in_file_order(group)
    return OutputUnit(file_name, tensors, _layout(tensors, keep_order=True).file_size)


def shard_units(plan: MergePlan) -> tuple[tuple[OutputUnit, ...], bool]:
    """The output shards and whether an index is written: the base's layout, or ``max_shard_size`` buckets."""
    max_shard_size = plan.recipe.max_shard_size
    if max_shard_size is None and not BASE_FORMATS[plan.base_format].keeps_file_layout:
        max_shard_size = DEFAULT_SHARD_BYTES  # the base's files are no safetensors layout to keep (GGUF)
    if max_shard_size is None:
        groups: dict[str, list[TensorJob]] = {name: [] for name in plan.base_files}
        home = {job.name: Path(job.source_file).name for job in plan.tensors}
        for job in plan.tensors:  # a fresh FP8 scale goes into its weight's shard
            groups[home[job.scale_of or job.name]].append(job)
        return tuple(_unit(file, group) for file, group in groups.items()), plan.base_indexed
    buckets: list[list[TensorJob]] = [[]]
    size = 0
    for job in plan.tensors:
        if buckets[-1] and size + job.out_bytes > max_shard_size and not job.scale_of:  # a scale stays with its weight
            buckets.append([])
            size = 0
        buckets[-1].append(job)
        size += job.out_bytes
    if len(buckets) == 1:
        return (_unit(SINGLE_FILE_NAME, buckets[0]),), False
    count = len(buckets)
    return tuple(_unit(SHARD_NAME_TEMPLATE.format(index=i + 1, count=count), b) for i, b in enumerate(buckets)), True


def model_files(plan: MergePlan) -> list[Path]:
    """The base's config, tokenizer and generation files: copied to the output (none from a GGUF base)."""
    if BASE_FORMATS[plan.base_format].generated_files is not None:
        return []
    base_root = Path(plan.base_dir)
    if base_root.is_file():
        base_root = base_root.parent
    return [path for path in sorted(base_root.iterdir())
            if path.is_file() and not path.name.startswith(".") and path.name not in NOT_COPIED_NAMES
            and not path.name.endswith((*WEIGHT_FILE_SUFFIXES, PARTIAL_SUFFIX))]


def _with_template(path: Path, template: str) -> bytes:
    """``tokenizer_config.json`` with its ``chat_template`` set, or ``chat_template.jinja`` replaced."""
    if path.name == CHAT_TEMPLATE_NAME:
        return template.encode()
    config = json.loads(path.read_text(encoding="utf-8"))
    config[CHAT_TEMPLATE_KEY] = template
    return (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode()


class HfModelSink(Sink):
    """Shards + index + config/tokenizer files: what ``from_pretrained`` loads."""

    format = "model"

    def __init__(self, plan: MergePlan) -> None:
        super().__init__(plan)
        self._units, self.write_index = shard_units(plan)
        fmt = BASE_FORMATS[plan.base_format]
        self.generated: dict[str, Callable[[], bytes]] = {}
        self._problems: list[str] = []
        if fmt.generated_files is not None:  # config and tokenizer rebuilt from the base (GGUF metadata)
            try:
                self.generated = fmt.generated_files(fmt.open(Path(plan.base_dir)))
            except StreamMergeError as e:
                self._problems.append(f"output_format: model: {e}")
        self.missing = fmt.missing_files()

    def problems(self) -> list[str]:
        if self.plan.recipe.rank is not None:
            return [*self._problems, "rank: only applies with output_format 'adapter' (--output-format adapter)"]
        return list(self._problems)

    def units(self) -> tuple[OutputUnit, ...]:
        return self._units

    def final_names(self) -> list[str]:
        names = [p.name for p in model_files(self.plan)] + list(self.generated)
        return names + [INDEX_NAME] if self.write_index else names

    def write_unit(self, unit: OutputUnit, out_dir: Path, source: TensorSource, tally: UnitTally,
                   progress: ProgressCallback | None) -> UnitResult:
        """Write one shard, tensor by tensor, and rename it into place when complete.

        Merging happens on this thread; writes, checksums and byte copies run on a background
        stage behind a bounded queue, so the disk stays busy while the next tensor is merged.
        """
        layout = _layout(unit.tensors, keep_order=True)
        with ShardWriter(out_dir / unit.file_name, layout) as writer, \
                OrderedStage("streammerge-writer", max_pending=WRITE_QUEUE_DEPTH) as stage:
            for i, job in enumerate(unit.tensors):
                if i + 1 < len(unit.tensors):
                    source.prefetch(unit.tensors[i + 1])
                if job.is_copy:
                    for copy in source.copy_ranges(job):
                        stage.submit(partial(copy, writer.write_bytes))
                    tally.tensors_copied += 1
                else:
                    blocks, stats = source.merged_blocks(job)
                    for block in blocks:
                        stage.submit(partial(writer.write_tensor_block, job.name, block))
                        del block
                    if stats:
                        tally.stats[job.name] = stats
                    tally.tensors_merged += 1
                if progress is not None:
                    progress(job.name, job.out_bytes)
            stage.drain()
            digest = writer.commit()
        return UnitResult(layout.file_size, digest)

    def finish(self, out_dir: Path, extras: list[dict[str, Any]]) -> list[str]:
        """Copy config, tokenizer and generation files (applying the plan's config updates); write the index."""
        names = []
        for path in model_files(self.plan):
            if path.name == CONFIG_NAME and (self.plan.config_updates or self.plan.config_drops):
                config = json.loads(path.read_text(encoding="utf-8"))
                config.update(dict(self.plan.config_updates))
                for key in self.plan.config_drops:
                    config.pop(key, None)
                write_bytes_atomic(out_dir / CONFIG_NAME, (json.dumps(config, indent=2) + "\n").encode())
            elif self.plan.chat_template is not None and path.name in (TOKENIZER_CONFIG_NAME, CHAT_TEMPLATE_NAME):
                write_bytes_atomic(out_dir / path.name, _with_template(path, self.plan.chat_template))
            else:
                copy_file_atomic(path, out_dir / path.name)
            names.append(path.name)
            kill_point("file")
        for name, produce in self.generated.items():
            data = produce()
            if name == CONFIG_NAME:
                config = json.loads(data)
                config.update(dict(self.plan.config_updates))
                data = (json.dumps(config, indent=2) + "\n").encode()
            write_bytes_atomic(out_dir / name, data)
            names.append(name)
            kill_point("file")
        if self.write_index:
            weight_map = {t.name: u.file_name for u in self._units for t in u.tensors}
            write_index(out_dir, weight_map, sum(t.out_bytes for t in self.plan.tensors))
            kill_point("file")
            names.append(INDEX_NAME)
        return names

    def output_bytes(self) -> int:
        shards = sum(u.size or 0 for u in self._units)
        generated = len(self.generated) * GENERATED_FILE_BYTES
        return shards + generated + sum(p.stat().st_size for p in model_files(self.plan))

    def describe(self) -> str:
        shards = sum(u.size or 0 for u in self._units)
        return (f"write: {self.plan.tensor_count} tensors ({self.plan.merged_count} merged) into "
                f"{len(self._units)} shard(s), {format_size(shards)}" + (" + index" if self.write_index else "")
                + ", config/tokenizer files, README.md, streammerge_recipe.json"
                + (f"; not written (the base does not hold it): {self.missing}" if self.missing else ""))

    def card_facts(self) -> CardFacts:
        return CardFacts(
            library_name="transformers", title="Merged model",
            usage=("```python", "from transformers import AutoModelForCausalLM",
                   'model = AutoModelForCausalLM.from_pretrained("path/to/this/model")', "```"))

    @classmethod
    def check_output(cls, out_dir: Path, unit_names: list[str] | None) -> tuple[list[str], list[str], list[str]]:
        """The directory loads as a checkpoint and its index names exactly the journaled shards (``unit_names``)."""
        checked: list[str] = []
        problems: list[str] = []
        notes: list[str] = []
        try:
            layout = open_checkpoint(out_dir)
        except StreamMergeError as e:
            return checked, [f"the model directory does not load: {e}"], notes
        found = sorted(p.name for p in layout.shards)
        if unit_names is None:  # not written by streammerge: the headers are all there is to check
            checked += [f"{name}: header valid, {len(layout.headers[out_dir / name].tensors)} tensors" for name in found]
        elif found != sorted(unit_names):
            problems.append(f"the index names shards {found}, the journal {sorted(unit_names)}")
        stray = sorted(p.name for p in out_dir.glob("*" + SAFETENSORS_SUFFIX) if p.name not in found)
        if stray:
            notes.append(f"safetensors files no index entry points to: {stray[:5]}")
        return checked, problems, notes
