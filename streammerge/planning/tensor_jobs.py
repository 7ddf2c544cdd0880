"""The plan's per-tensor data: which base tensor an output tensor is read from and which inputs change it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..io.dtypes import byte_size


@dataclass(frozen=True)
class Contribution:
    """How one input changes one output tensor.

    Attributes:
        input_index: position of the input in the recipe.
        kind: the input kind, a key of ``inputs.kinds.KINDS`` (what ``keys`` are and how they
            become a task update).
        file: the safetensors file holding ``keys``.
        keys: tensor names inside ``file``.
        scale: LoRA scaling s (folded into B), 1 otherwise.
        transposed: the stored tensor is (B A)ᵀ (fan_in_fan_out or embedding LoRA).
        weight: the input's user weight w_i on this tensor (per-layer / per-module recipe weights).
        rank: the LoRA rank r (0 for dense contributions); sizes the memory estimate.
    """

    input_index: int
    kind: str
    file: str
    keys: tuple[str, ...]
    scale: float = 1.0
    transposed: bool = False
    weight: float = 1.0
    rank: int = 0
    part: tuple[int, ...] = ()
    """Kind-specific integers (``expert_lora``: expert, experts, first and end row of the fused d_out)."""
    params: tuple[tuple[str, float], ...] = ()
    """The input's own per-input method parameters on this tensor (``InputSpec.params_for``)."""


@dataclass(frozen=True)
class TensorJob:
    """One output tensor: read ``source`` from the base, apply contributions, cast, write."""

    name: str
    source: str
    source_file: str
    dtype: str
    out_dtype: str
    shape: tuple[int, ...]
    contributions: tuple[Contribution, ...] = ()
    scale: str = ""
    """An FP8 base weight's ``weight_scale_inv`` tensor (the worker dequantizes ``source`` with it)."""
    scale_file: str = ""
    scale_of: str = ""
    """FP8 output: this tensor is the fresh ``weight_scale_inv`` of merged FP8 weight ``scale_of``, computed
    while that weight is requantized and written right after it in the same shard."""
    params: tuple[tuple[str, Any], ...] = ()
    """Method parameters of this tensor only (``normalize: total``'s ``all_weights``)."""

    @property
    def is_copy(self) -> bool:
        """Untouched and not cast: copied byte for byte."""
        return (not self.contributions and not self.scale_of and self.dtype == self.out_dtype
                and self.source == self.name)

    @property
    def out_bytes(self) -> int:
        return byte_size(self.out_dtype, self.shape)
