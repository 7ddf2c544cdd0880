"""``--output-format gguf``: merge straight into a llama.cpp model, one pass, no HF copy in between.

Units are GGUF files: ``model.gguf``, or llama.cpp's split layout ``model-0000k-of-0000n.gguf``
with ``--max-shard-size``.  The whole layout — metadata, tokenizer, tensor infos, offsets — comes
from the plan and the base's ``config.json`` / tokenizer files before any tensor is merged
(``gguf_layout.py``, checked against llama.cpp's ``convert_hf_to_gguf.py``); each file is then
written tensor by tensor from the worker's merged row blocks, encoded to the GGUF type (f32, f16,
bf16, q8_0) and, for Llama-family Q/K, permuted as the converter does (``gguf_export.py``).
Untouched tensors go through the worker too: their GGUF type and layout differ from the HF bytes.
Over a GGUF base the layout is the base's own (metadata, tensor order, ``gguf_from_base.py``):
changed tensors are re-encoded to the --gguf-type, untouched ones copied in their stored bytes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..errors import InputError, StreamMergeError
from ..inputs.base_formats import GGUF
from ..inputs.gguf_checkpoint import ggml_type_of
from ..planning.describe import format_size
from ..planning.plan import MergePlan
from .base import CardFacts, OutputUnit, ProgressCallback, Sink, TensorSource, UnitResult, UnitTally

__all__ = ["GgufSink", "base_gguf_type"]

GGUF_FILE_NAME = "model.gguf"


def base_gguf_type(matrix_dtypes: Iterable[str]) -> str:
    """The default --gguf-type over a GGUF base: its first matrix's type when it is one we write, else q8_0."""
    for dtype in matrix_dtypes:
        ggml = (ggml_type_of(dtype) or dtype).lower()
        if ggml in ("f16", "bf16", "q8_0"):
            return ggml
    return "q8_0"


class GgufSink(Sink):
    """One GGUF file (or a split set) that llama.cpp loads."""

    format = "gguf"

    def __init__(self, plan: MergePlan) -> None:
        super().__init__(plan)
        self._problems: list[str] = []
        self.layout: Any = None
        self.files: list[Any] = []
        try:
            from .gguf_export import plan_files, planned_size  # gguf-py is an optional dependency
            from .gguf_layout import build_layout, default_gguf_type
        except ImportError as e:
            self._problems.append(f"output_format: gguf needs the `gguf` and `tokenizers` packages ({e}); "
                                  "pip install 'streammerge[gguf]'")
            self._units: tuple[OutputUnit, ...] = ()
            return
        jobs = plan.tensors
        root = Path(plan.base_dir)
        self.base: Any = None
        try:
            if plan.base_format == GGUF.name:  # metadata and untouched tensors carried over from the base
                self.base = GGUF.open(root)
                gguf_type = plan.recipe.gguf_type or base_gguf_type(t.dtype for t in jobs if len(t.shape) == 2)
                self.layout = self._layout_from_base(gguf_type)
            else:
                gguf_type = plan.recipe.gguf_type or default_gguf_type(t.dtype for t in jobs if len(t.shape) == 2)
                self.layout = build_layout(root if root.is_dir() else root.parent,
                                           [(t.name, t.out_dtype, t.shape) for t in jobs], gguf_type)
        except StreamMergeError as e:
            self._problems.append(f"output_format: gguf: {e}")
            self._units = ()
            return
        self.gguf_type = gguf_type
        self.files = plan_files(self.layout, Path(GGUF_FILE_NAME), plan.recipe.max_shard_size)
        by_name = {t.name: t for t in jobs}
        self._units = tuple(OutputUnit(fp.path.name, tuple(by_name[t.hf_name] for t in fp.tensors if t.hf_name),
                                       planned_size(self.layout, fp)) for fp in self.files)

    def _layout_from_base(self, gguf_type: str) -> Any:
        from .gguf_from_base import layout_from_base
        from .gguf_layout import GGUF_TYPES
        if gguf_type not in GGUF_TYPES:
            raise InputError(f"--gguf-type {gguf_type!r} is not one of {list(GGUF_TYPES)}")
        changed = {t.name for t in self.plan.tensors if t.contributions}
        layout = layout_from_base(self.base.gguf, gguf_type, changed)
        lost = sorted(changed - {t.hf_name for t in layout.tensors})
        if lost:
            raise InputError(f"the merge changes {lost}, which the GGUF base {str(self.base.shards[0])!r} does not "
                             "store (a tied lm_head: llama.cpp reads token_embd); leave them out of the recipe "
                             "(exclude), or use --output-format model")
        return layout

    def problems(self) -> list[str]:
        problems = list(self._problems)
        if self.plan.recipe.rank is not None:
            problems.append("rank: only applies with output_format 'adapter' (--output-format adapter)")
        return problems

    def units(self) -> tuple[OutputUnit, ...]:
        return self._units

    def final_names(self) -> list[str]:
        return []

    def write_unit(self, unit: OutputUnit, out_dir: Path, source: TensorSource, tally: UnitTally,
                   progress: ProgressCallback | None) -> UnitResult:
        from .gguf_export import RowEncoder, generated_bytes, open_file
        from .gguf_from_base import stored_bytes
        fp = next(f for f in self.files if f.path.name == unit.file_name)
        jobs = {job.name: job for job in unit.tensors}
        with open_file(self.layout, replace(fp, path=out_dir / fp.path.name)) as writer:
            for tensor in fp.tensors:
                if tensor.hf_name is None and tensor.copy_from_base:  # a GGUF base's own (rope_freqs)
                    writer.write_bytes(tensor.name, stored_bytes(self.base.gguf, tensor.name))
                    continue
                if tensor.hf_name is None:  # generated by the layout (rope_freqs)
                    writer.write_bytes(tensor.name, generated_bytes(tensor))
                    continue
                job = jobs[tensor.hf_name]
                if tensor.copy_from_base:  # untouched tensor of a GGUF base: its stored bytes
                    for copy in source.copy_ranges(job):
                        copy(lambda _key, data, name=tensor.name: writer.write_bytes(name, data))
                    tally.tensors_copied += 1
                    if progress is not None:
                        progress(job.name, tensor.nbytes)
                    continue
                encoder = RowEncoder(tensor)
                blocks, stats = source.merged_blocks(job)
                for block in blocks:
                    writer.write_bytes(tensor.name, encoder.feed(block))
                encoder.finish()
                if job.contributions:
                    tally.tensors_merged += 1
                    if stats:
                        tally.stats[job.name] = stats
                else:
                    tally.tensors_copied += 1
                if progress is not None:
                    progress(job.name, job.out_bytes)
            size, digest = writer.commit()
        return UnitResult(size, digest)

    def finish(self, out_dir: Path, extras: list[dict[str, Any]]) -> list[str]:
        return []

    def output_bytes(self) -> int:
        return sum(u.size or 0 for u in self._units)

    def describe(self) -> str:
        if self.layout is None:
            return "write: GGUF (not possible, see the problems)"
        copied = sum(1 for t in self.layout.tensors if t.copy_from_base)
        kept = f" ({copied} copied from the GGUF base as stored)" if self.base is not None else ""
        return (f"write: GGUF for llama.cpp ({self.layout.arch}, {self.gguf_type}): {len(self.layout.tensors)} "
                f"tensors{kept} in {len(self._units)} file(s), {format_size(self.output_bytes())}; "
                "README.md, streammerge_recipe.json")

    def card_facts(self) -> CardFacts:
        return CardFacts(library_name="gguf", title="Merged model (GGUF)", tags=("gguf",),
                         usage=("```bash", "llama-cli -m model.gguf -p 'Hello'", "```"))

    @classmethod
    def check_output(cls, out_dir: Path, unit_names: list[str] | None) -> tuple[list[str], list[str], list[str]]:
        """Every file starts with the GGUF magic (sizes and checksums are the journal's)."""
        checked, problems = [], []
        for name in unit_names or []:
            with open(out_dir / name, "rb") as f:
                if f.read(4) != b"GGUF":
                    problems.append(f"{name}: not a GGUF file")
                else:
                    checked.append(f"{name}: GGUF magic ok")
        return checked, problems, []
