"""streammerge: streaming, out-of-core merging of LoRA adapters and fine-tunes into LLMs."""

from __future__ import annotations

import os as _os
import sys as _sys

if "torch" not in _sys.modules:
    # Idle OpenMP threads sleep instead of spinning.  Much of a merge is small ops (DO-Merging's
    # Adam steps, row norms, SVDs of [Σr, d] stacks); with spinning threads, one descheduled by
    # another busy process stalls every parallel region: measured on a 2-core VM with two other
    # busy processes, a 4-adapter DO-Merging of the `small` preset took 70 s spinning, 3.7 s passive.
    # A value the user set wins; it only takes effect if torch is not loaded yet.
    _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .errors import StreamMergeError
from .version import __version__
from .execution.engine import build_plan, run_plan
from .jobs.report import MergeReport
from .methods import REGISTRY as METHODS
from .planning.plan import MergePlan
from .recipe import InputSpec, Recipe, WeightOverride, load_recipe_file
from .jobs.verify import Verification, verify_output


__all__ = ["METHODS", "InputSpec", "MergePlan", "MergeReport", "Recipe", "StreamMergeError", "WeightOverride",
           "build_plan", "load_recipe_file", "merge", "run_plan", "verify_output", "Verification", "__version__"]


def merge(recipe: Recipe, out_dir: str, *, restart: bool = False, check_finite: bool = True,
          allow_pickle: bool = False) -> MergeReport:
    """Plan and run ``recipe`` into ``out_dir``: the library's one-call entry point.

    Re-running it after an interruption resumes; see ``run_plan`` and ``build_plan`` for the options.
    """
    return run_plan(build_plan(recipe, allow_pickle=allow_pickle), out_dir, restart=restart,
                    check_finite=check_finite)
