"""Output formats: one sink per ``--output-format`` value, chosen from this table."""

from __future__ import annotations

from ..planning.plan import MergePlan
from .base import CardFacts, OutputUnit, Sink, TensorSource, UnitResult, UnitTally
from .hf_model import HfModelSink
from .gguf import GgufSink
from .peft_adapter import PeftAdapterSink

__all__ = ["SINKS", "sink_for", "Sink", "OutputUnit", "UnitResult", "UnitTally", "TensorSource", "CardFacts"]

SINKS: dict[str, type[Sink]] = {sink.format: sink for sink in (HfModelSink, PeftAdapterSink, GgufSink)}


def sink_for(plan: MergePlan) -> Sink:
    """The sink of the plan's output format."""
    return SINKS[plan.recipe.output_format](plan)
