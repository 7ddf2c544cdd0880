"""The sink protocol: where merged tensors go.

A sink is one output format.  From the plan it lays out its **output units** — the pieces of
output that are written whole and journaled one by one (a safetensors shard, a part of an
adapter) — writes each unit from the tensors the worker hands it, and at the end writes the
files that need every unit (an index, a config, the final adapter file).  The job lifecycle
(``execution.engine``, ``jobs/``) is the same for every sink: journal, resume, no-op re-run,
``--restart``, free-space check, lock, ``verify``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch

from ..methods import MergeResult
from ..planning.plan import MergePlan, TensorJob

__all__ = ["OutputUnit", "UnitResult", "UnitTally", "TensorSource", "Sink", "CardFacts", "ProgressCallback"]

ProgressCallback = Callable[[str, int], None]


@dataclass(frozen=True)
class OutputUnit:
    """One journaled piece of output: a file written whole from ``tensors``, in this order.

    Attributes:
        file_name: the file in the output directory.
        tensors: the plan's tensor jobs this unit writes.
        size: its size in bytes when the plan determines it (None when it depends on the merge,
            e.g. the ranks of adapter factors).
    """

    file_name: str
    tensors: tuple[TensorJob, ...]
    size: int | None


@dataclass
class UnitTally:
    """What writing one unit did: counts, per-tensor method stats and what the sink must remember."""

    tensors_merged: int = 0
    tensors_copied: int = 0
    stats: dict[str, dict[str, float]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    """JSON data a sink needs again in ``finish`` (journaled with the unit, so a resumed job has it)."""


@dataclass(frozen=True)
class UnitResult:
    """A written unit file."""

    size: int
    sha256: str


@dataclass(frozen=True)
class CardFacts:
    """What the model card says about the output format."""

    library_name: str
    title: str
    usage: tuple[str, ...]
    sentence: str = ""
    """Appended to the card's first sentence."""
    tags: tuple[str, ...] = ()
    base_model_relation: str | None = "merge"
    """The Hub's ``base_model_relation``; None: the output is an adapter *of* the base."""


class TensorSource(Protocol):
    """What the worker offers a sink (``execution.worker.TensorMerger``)."""

    def merged_blocks(self, job: TensorJob) -> tuple[Iterator[torch.Tensor], dict[str, float]]:
        """``W0 + ΔW`` as row blocks (stored orientation, output dtype, CPU) and method stats."""
        ...

    def merge_update(self, job: TensorJob) -> tuple[MergeResult | None, torch.Tensor | None, bool]:
        """The method's result in canonical orientation, the base values if read, and whether stored transposed."""
        ...

    def copy_ranges(self, job: TensorJob) -> Iterator[Callable[[Callable[[str, bytes], None]], None]]:
        """For an untouched tensor: callables that copy its stored bytes, chunk by chunk, into a writer."""
        ...

    def prefetch(self, job: TensorJob) -> None:
        """Ask the kernel to start reading ``job``'s base tensor."""
        ...


class Sink(ABC):
    """One output format: its units, how a unit is written, and what is written once all are.

    Subclasses are constructed from a plan (``Sink(plan)``) and must not write anything before
    ``write_unit`` / ``finish`` is called.
    """

    format: ClassVar[str]
    """The ``--output-format`` value."""
    keeps_units: ClassVar[bool] = True
    """Unit files are part of the finished output (shards); False: scratch files ``finish`` consumes."""

    def __init__(self, plan: MergePlan) -> None:
        self.plan = plan

    @abstractmethod
    def problems(self) -> list[str]:
        """Every reason this plan cannot be written in this format (checked at plan time)."""

    @abstractmethod
    def units(self) -> tuple[OutputUnit, ...]:
        """The output units, in the order they are written."""

    @abstractmethod
    def final_names(self) -> list[str]:
        """The files ``finish`` writes (besides the recipe and model card, which the lifecycle writes)."""

    @abstractmethod
    def write_unit(self, unit: OutputUnit, out_dir: Path, source: TensorSource, tally: UnitTally,
                   progress: ProgressCallback | None) -> UnitResult:
        """Write ``unit`` durably (to a partial file, renamed when complete) and count what was done."""

    @abstractmethod
    def finish(self, out_dir: Path, extras: list[dict[str, Any]]) -> list[str]:
        """Write the files that need every unit; ``extras`` are the units' ``UnitTally.extra``, in unit order."""

    @abstractmethod
    def describe(self) -> str:
        """One line for ``streammerge plan``: what will be written and about how big it is."""

    @abstractmethod
    def card_facts(self) -> CardFacts:
        """What the model card says about this output."""

    @abstractmethod
    def output_bytes(self) -> int:
        """About how many bytes the finished output holds (for the free-space check and ``plan``)."""

    @classmethod
    def check_output(cls, out_dir: Path, unit_names: list[str] | None) -> tuple[list[str], list[str], list[str]]:
        """Format-specific checks of a finished output: (checked lines, problems, notes).

        ``unit_names`` are the journaled units (None: the directory was not written by streammerge).
        """
        return [], [], []
