"""streammerge: streaming, out-of-core merging of LoRA adapters and fine-tunes into LLMs."""

from __future__ import annotations

from .engine import MergeReport, run_plan
from .errors import StreamMergeError
from .methods import REGISTRY as METHODS
from .plan import MergePlan, build_plan
from .recipe import InputSpec, Recipe

__version__ = "0.1.0"

__all__ = ["METHODS", "InputSpec", "MergePlan", "MergeReport", "Recipe", "StreamMergeError", "build_plan",
           "merge", "run_plan", "__version__"]


def merge(recipe: Recipe, out_dir: str) -> MergeReport:
    """Plan and run ``recipe`` into ``out_dir``: the library's one-call entry point."""
    return run_plan(build_plan(recipe), out_dir)
