"""The whole-model first pass of TIES ``scope: global``: each input's top ``density`` over every tensor it changes.

Before the first output unit, the engine feeds every changed tensor's task vectors to a
``methods.rows.ModelTrim`` (a first look at a few rows of each, then usually one pass over the
row blocks; statistics only, never the deltas) and hands the per-tensor thresholds to the worker.
The result is journaled: a resumed job reads it back instead of running the pass again.
"""

from __future__ import annotations

from ..jobs.journal import Journal, JournalState
from ..methods.rows import ModelThresholds, ModelTrim
from ..planning.plan import MergePlan
from .worker import TensorMerger

__all__ = ["needs_model_pass", "prepare_model_statistics", "model_thresholds"]


def needs_model_pass(plan: MergePlan) -> bool:
    """Whether ``plan``'s method takes whole-model statistics (``scope: global``)."""
    return dict(plan.method_params).get("scope", "tensor") == "global"


def model_thresholds(plan: MergePlan, merger: TensorMerger) -> ModelThresholds:
    """Run the whole-model selection over ``plan``'s changed tensors (in plan order: the tie-breaking order)."""
    jobs = [job for job in plan.tensors if job.contributions]
    tensors: list[dict[str, tuple[int, ...]]] = [{} for _ in plan.recipe.inputs]
    for job in jobs:
        inputs, shape = merger.model_segments(job)
        for i in inputs:
            tensors[i][job.name] = shape
    trim = ModelTrim(dict(plan.method_params)["density"], tensors)
    for job in jobs:
        merger.feed_model_pass(trim, job, first_look=True)
    while trim.needs_pass():
        for job in jobs:
            merger.feed_model_pass(trim, job, first_look=False)
        trim.end_pass()
    return trim.result()


def prepare_model_statistics(plan: MergePlan, merger: TensorMerger, state: JournalState | None,
                             journal: Journal | None) -> None:
    """Give ``merger`` the whole-model thresholds when the method needs them: from the journal of a resumed
    job, else from a first pass (then journaled, when ``journal`` is given)."""
    if not needs_model_pass(plan):
        return
    if state is not None and state.statistics is not None:
        merger.model_statistics = ModelThresholds.from_record(state.statistics)
        return
    thresholds = model_thresholds(plan, merger)
    if journal is not None:
        journal.add_statistics(thresholds.record())
    merger.model_statistics = thresholds
