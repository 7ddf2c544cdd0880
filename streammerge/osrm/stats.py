"""Per-task input statistics of the target modules, cached on disk as safetensors.

One file per task, ``<stats dir>/<task>.safetensors``, holds for every module ``Σ x xᵀ``
(float64), ``Σ x`` (float64) and the token count, so the moments of any subset of tasks can
be formed later.  The file's metadata carries a fingerprint of everything the numbers depend
on (base model, tokenizer, task data, truncation, compute dtype); a cached file is reused
only when its fingerprint matches, so adding a task never reruns the others.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError
from ..io.atomic import file_sha256 as io_file_sha256
from ..io.writer import save_tensors
from ..names import DEFAULT_METADATA, PICKLE_WEIGHT_SUFFIXES, SAFETENSORS_SUFFIX
from .subspace import ModuleStats

__all__ = [
    "STATS_DIR_NAME",
    "TaskStats",
    "stats_path",
    "save_task_stats",
    "load_task_stats",
    "file_sha256",
    "model_fingerprint",
]

STATS_DIR_NAME = ".osrm_stats"
STATS_FILE_TEMPLATE = "{task}" + SAFETENSORS_SUFFIX
STATS_FORMAT_VERSION = "1"
FINGERPRINT_KEY = "osrm_fingerprint"
MODULES_KEY = "osrm_modules"
_SUM_X, _SUM_XXT, _COUNT = "sum_x", "sum_xxT", "count"


@dataclass
class TaskStats:
    """The statistics of one task: a fingerprint and per-module sums.

    Attributes:
        fingerprint: what the sums depend on (plain JSON data).
        modules: module name → its ``ModuleStats``.
    """

    fingerprint: dict[str, Any]
    modules: dict[str, ModuleStats]

    @property
    def has_second_moments(self) -> bool:
        return all(m.sum_xxT is not None for m in self.modules.values())

    def covers(self, fingerprint: Mapping[str, Any], modules: Collection[str], second_moments: bool) -> bool:
        """Whether these statistics answer a request without running the model again."""
        if dict(fingerprint) != self.fingerprint:
            return False
        if not set(modules) <= set(self.modules):
            return False
        return self.has_second_moments or not second_moments


def stats_path(stats_dir: Path, task: str) -> Path:
    """Where the statistics of ``task`` are cached."""
    return Path(stats_dir) / STATS_FILE_TEMPLATE.format(task=task)


def _key(module: str, part: str) -> str:
    # Module names are dotted; "/" cannot occur in them.
    return f"{module}/{part}"


def save_task_stats(path: Path, stats: TaskStats) -> None:
    """Atomically write ``stats`` (tensors moved to CPU) to ``path``."""
    tensors: dict[str, torch.Tensor] = {}
    for module, m in stats.modules.items():
        tensors[_key(module, _SUM_X)] = m.sum_x.detach().double().cpu().contiguous()
        tensors[_key(module, _COUNT)] = torch.tensor([m.count], dtype=torch.int64)
        if m.sum_xxT is not None:
            tensors[_key(module, _SUM_XXT)] = m.sum_xxT.detach().double().cpu().contiguous()
    metadata = dict(DEFAULT_METADATA)
    metadata[FINGERPRINT_KEY] = json.dumps(stats.fingerprint, sort_keys=True)
    metadata[MODULES_KEY] = json.dumps(sorted(stats.modules))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_tensors(Path(path), tensors, metadata)


def load_task_stats(path: Path) -> TaskStats | None:
    """Read cached statistics; None when there is no file.

    Raises:
        InputError: the file exists but cannot be read (delete it to recollect).
    """
    path = Path(path)
    if not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            fingerprint = json.loads(meta[FINGERPRINT_KEY])
            modules = json.loads(meta[MODULES_KEY])
            keys = set(f.keys())
            out: dict[str, ModuleStats] = {}
            for module in modules:
                xxT = f.get_tensor(_key(module, _SUM_XXT)) if _key(module, _SUM_XXT) in keys else None
                out[module] = ModuleStats(count=int(f.get_tensor(_key(module, _COUNT))[0]),
                                          sum_x=f.get_tensor(_key(module, _SUM_X)), sum_xxT=xxT)
    except Exception as e:  # safetensors raises its own error types; all mean "unreadable"
        raise InputError(f"the cached OSRM statistics {str(path)!r} cannot be read ({e}); "
                         "delete the file and run again to recollect them") from e
    return TaskStats(fingerprint=fingerprint, modules=out)


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes (``InputError`` naming it when it cannot be read)."""
    try:
        return io_file_sha256(path)
    except OSError as e:
        raise InputError(f"cannot read {str(path)!r}: {e.strerror or e}") from e


_WEIGHT_SUFFIXES = (SAFETENSORS_SUFFIX, *PICKLE_WEIGHT_SUFFIXES)


def model_fingerprint(model_dir: Path) -> str:
    """A cheap fingerprint of a model directory.

    Small files (config, tokenizer) are hashed by content; weight files by name, size and
    modification time, so a changed or replaced checkpoint invalidates the cache without
    reading gigabytes.  (A copied directory gets new times and so recollects: the safe side.)
    """
    digest = hashlib.sha256()
    root = Path(model_dir)
    if not root.is_dir():
        raise InputError(f"base model path {str(root)!r} is not a directory")
    for path in sorted(p for p in root.iterdir() if p.is_file()):
        digest.update(path.name.encode() + b"\0")
        if path.name.endswith(_WEIGHT_SUFFIXES):
            st = os.stat(path)
            digest.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
        else:
            digest.update(file_sha256(path).encode())
    return digest.hexdigest()
