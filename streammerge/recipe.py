"""A merge recipe: frozen dataclasses, the one description of a job that the CLI, recipe
files, the plan hash, the journal and the model card all share."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .errors import InputError

INPUT_KINDS = ("adapter", "model")
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class InputSpec:
    """One merge input.

    Attributes:
        path: a PEFT LoRA adapter directory (kind "adapter") or a full fine-tuned model
            directory (kind "model", task vector = model − base).
        kind: "adapter" or "model".
        weight: the user weight w_i of this input.
    """

    path: str
    kind: str = "adapter"
    weight: float = 1.0


@dataclass(frozen=True)
class Recipe:
    """Everything that determines the merged bytes (and nothing that does not).

    Attributes:
        base: base model directory.
        inputs: adapters and/or full fine-tunes, in order.
        method: merge method name (see ``streammerge methods``).
        params: method parameters as (name, value) pairs, validated against the method.
        dtype: output dtype for floating tensors ("bfloat16", "float16", "float32"), or None
            to keep each tensor's base dtype.
        seed: seed of the per-tensor random generators (DARE).
        max_shard_size: reshard the output into shards of at most this many bytes, or None
            to keep the base's shard layout.
        device: worker device "auto" (CUDA when present), "cpu" or "cuda"; does not change the
            result beyond floating-point rounding, so it is not part of the hash.
    """

    base: str
    inputs: tuple[InputSpec, ...]
    method: str = "task_arithmetic"
    params: tuple[tuple[str, Any], ...] = ()
    dtype: str | None = None
    seed: int = 0
    max_shard_size: int | None = None
    device: str = field(default="auto", compare=False)

    def validate(self) -> list[str]:
        """Every problem with the recipe's own fields (not the files they name)."""
        problems = []
        if not self.base:
            problems.append("no base model given (--base)")
        if not self.inputs:
            problems.append("no inputs given: pass at least one --adapter or --model")
        for i, spec in enumerate(self.inputs):
            if spec.kind not in INPUT_KINDS:
                problems.append(f"input {i} ({spec.path!r}): kind {spec.kind!r} must be one of {INPUT_KINDS}")
        if self.device not in DEVICES:
            problems.append(f"device {self.device!r} must be one of {DEVICES}")
        if self.max_shard_size is not None and self.max_shard_size <= 0:
            problems.append(f"max_shard_size must be positive, got {self.max_shard_size}")
        return problems

    def to_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["inputs"] = [asdict(s) for s in self.inputs]
        doc["params"] = dict(self.params)
        return doc

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> Recipe:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(doc) - known)
        if unknown:
            raise InputError(f"unknown recipe field(s) {unknown}; known: {sorted(known)}")
        values = dict(doc)
        values["inputs"] = tuple(InputSpec(**s) for s in doc.get("inputs", ()))
        values["params"] = tuple(sorted((doc.get("params") or {}).items()))
        return cls(**values)

    def fingerprint(self) -> str:
        """SHA-256 of the fields that determine the output bytes."""
        doc = self.to_dict()
        doc.pop("device")
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """Parse "5GB", "500MiB", "1024" into bytes."""
    s = text.strip().upper().replace(" ", "")
    number = s.rstrip("KMGTIB")
    unit = s[len(number):]
    try:
        value = float(number)
    except ValueError:
        raise InputError(f"cannot read size {text!r}; use e.g. 5GB, 500MiB or a byte count") from None
    if unit not in SIZE_UNITS:
        raise InputError(f"unknown size unit in {text!r}; use one of B, KB, MB, GB, KiB, MiB, GiB")
    return int(value * SIZE_UNITS[unit])
