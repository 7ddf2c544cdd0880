"""OSRM (arXiv 2505.22934): orthogonal-subspace LoRA initialisation before fine-tuning.

``subspace``  pure tensor math (eigen-subspaces, projection), testable without files
``data``      task files → token ids → right-padded batches
``collect``   the base model (transformers, imported lazily) and statistics hooks
``stats``     per-task statistics cached on disk (safetensors) with a fingerprint
``adapter``   PEFT adapter directories
``run``       the end-to-end flow: ``osrm_init`` and ``osrm_project``
``commands``  the ``osrm-init`` / ``osrm-project`` subcommands
"""

from __future__ import annotations

from .run import CollectOptions, GatherReport, gather_stats, osrm_init, osrm_project
from .subspace import (
    ModuleStats,
    Subspace,
    captured_energy,
    covariance_subspace,
    means_subspace,
    project_factors,
    smallest_eigenvectors,
)

__all__ = [
    "CollectOptions",
    "GatherReport",
    "ModuleStats",
    "Subspace",
    "captured_energy",
    "covariance_subspace",
    "gather_stats",
    "means_subspace",
    "osrm_init",
    "osrm_project",
    "project_factors",
    "smallest_eigenvectors",
]
