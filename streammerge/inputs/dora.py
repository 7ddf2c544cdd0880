"""DoRA (weight-decomposed LoRA) as a task vector, streamed in row blocks.

PEFT (``peft.tuners.lora.variants.DoraLinearVariant.merge_safe``) merges a DoRA module as
``W' = m ⊙ (W0 + ΔW) / ‖W0 + ΔW‖`` with ``ΔW = s·B·A`` and the norm taken, in the
``nn.Linear`` orientation ``[d_out, d_in]``, over each *output row* (``dim=1``); ``m`` is the
saved ``lora_magnitude_vector`` ``[d_out]``.  For ``nn.Embedding`` PEFT uses the same rule on
the transposed weight (``DoraEmbeddingLayer(fan_in_fan_out=True)``): ``m`` is ``[hidden]``
and each norm runs over the whole vocabulary, so in the stored ``[vocab, hidden]`` layout it
is a per-*column* norm.  The same holds for ``fan_in_fan_out`` linears (GPT-2 ``Conv1D``).

So the task vector ``τ = W' − W0`` is row-local in the stored layout for plain linears (one
pass over row blocks), and needs one extra pass of column sums of squares for embeddings and
``Conv1D`` (two passes, still one row block in memory at a time).  Everything is fp32.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

__all__ = [
    "DORA_MAGNITUDE_PART", "lora_delta_rows", "dora_task_rows", "dora_column_sq_norms",
    "dora_task_rows_by_column", "dora_task_vector", "iter_dora_task_blocks",
]

DORA_MAGNITUDE_PART = "lora_magnitude_vector"
"""The adapter-file key part of DoRA's magnitude: ``base_model.model.<module>.lora_magnitude_vector``."""


def lora_delta_rows(down: torch.Tensor, up: torch.Tensor, start: int, stop: int,
                    transposed: bool) -> torch.Tensor:
    """Rows ``start:stop`` of the stored-layout delta ``up @ down`` (``(up @ down)ᵀ`` when ``transposed``).

    Args:
        down: ``A`` ``[r, d_in]`` (``lora_embedding_A`` ``[r, vocab]`` for embeddings).
        up: ``s·B`` ``[d_out, r]``, scale folded in.
        start: first stored row.
        stop: one past the last stored row.
        transposed: the stored tensor is ``[d_in, d_out]`` (embeddings, ``fan_in_fan_out``).
    """
    if transposed:
        return down[:, start:stop].T @ up.T
    return up[start:stop] @ down


def _safe_ratio(magnitude: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    # A zero row of W0 + ΔW has no direction: PEFT would produce NaN there; we keep it zero.
    return torch.where(norm > 0, magnitude / norm.clamp_min(torch.finfo(norm.dtype).tiny), torch.zeros_like(norm))


def dora_task_rows(base_rows: torch.Tensor, delta_rows: torch.Tensor, magnitude_rows: torch.Tensor) -> torch.Tensor:
    """``τ[rows]`` for a row-norm DoRA module (``nn.Linear``): ``m ⊙ (W0 + ΔW)/‖W0 + ΔW‖_row − W0``.

    Args:
        base_rows: ``W0[rows]`` ``[n, d_in]``, fp32.
        delta_rows: ``ΔW[rows]`` ``[n, d_in]`` with the scale folded in (``lora_delta_rows``).
        magnitude_rows: ``m[rows]`` ``[n]``.
    """
    merged = base_rows + delta_rows
    norm = torch.linalg.vector_norm(merged, dim=1)
    return merged * _safe_ratio(magnitude_rows, norm)[:, None] - base_rows


def dora_column_sq_norms(base_rows: torch.Tensor, delta_rows: torch.Tensor) -> torch.Tensor:
    """This block's share of ``‖(W0 + ΔW)[:, j]‖²`` for every stored column ``j`` (sum the blocks)."""
    merged = base_rows + delta_rows
    return (merged * merged).sum(dim=0)


def dora_task_rows_by_column(base_rows: torch.Tensor, delta_rows: torch.Tensor, magnitude: torch.Tensor,
                             column_norms: torch.Tensor) -> torch.Tensor:
    """``τ[rows]`` for a column-norm DoRA module (embedding, ``fan_in_fan_out``) in the stored layout.

    Args:
        base_rows: ``W0[rows]`` ``[n, d]``, fp32.
        delta_rows: ``ΔW[rows]`` ``[n, d]``.
        magnitude: the whole ``m`` ``[d]`` (one value per stored column).
        column_norms: ``‖(W0 + ΔW)[:, j]‖`` over *all* rows, ``[d]`` (sqrt of the summed
            ``dora_column_sq_norms``).
    """
    return (base_rows + delta_rows) * _safe_ratio(magnitude, column_norms)[None, :] - base_rows


def dora_task_vector(base: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor,
                     transposed: bool) -> torch.Tensor:
    """The whole ``τ`` of one module in its stored layout (small tensors, tests)."""
    if transposed:
        norms = dora_column_sq_norms(base, delta).sqrt()
        return dora_task_rows_by_column(base, delta, magnitude, norms)
    return dora_task_rows(base, delta, magnitude)


def iter_dora_task_blocks(read_base_rows: Callable[[int, int], torch.Tensor], down: torch.Tensor,
                          up: torch.Tensor, magnitude: torch.Tensor, rows: int, block_rows: int,
                          transposed: bool) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Stream ``τ`` of one DoRA module as ``(start, stop, τ[start:stop])`` in stored row blocks.

    Row-norm modules take one pass; column-norm modules (``transposed``) first sum column
    norms over every block, then produce the blocks, so the base is read twice.

    Args:
        read_base_rows: ``(start, stop) -> W0[start:stop]`` in fp32 (the engine's reader).
        down: ``A``; see ``lora_delta_rows``.
        up: ``s·B``.
        magnitude: ``m`` as saved (``[d_out]``; ``[hidden]`` for embeddings).
        rows: stored rows of the base tensor.
        block_rows: rows per block (> 0).
        transposed: the stored layout is ``[d_in, d_out]``.
    """
    if block_rows <= 0:
        raise ValueError(f"block_rows must be positive, got {block_rows}")
    magnitude = magnitude.float()
    starts = range(0, rows, block_rows)
    norms: torch.Tensor | None = None
    if transposed:
        # fp64 accumulator: a 128k-row vocabulary is summed over hundreds of blocks
        squares = torch.zeros(magnitude.shape[0], dtype=torch.float64, device=magnitude.device)
        for start in starts:
            stop = min(start + block_rows, rows)
            squares += dora_column_sq_norms(read_base_rows(start, stop), lora_delta_rows(down, up, start, stop, True))
        norms = squares.sqrt().float()
    for start in starts:
        stop = min(start + block_rows, rows)
        base_rows = read_base_rows(start, stop)
        delta_rows = lora_delta_rows(down, up, start, stop, transposed)
        if norms is None:
            yield start, stop, dora_task_rows(base_rows, delta_rows, magnitude[start:stop])
        else:
            yield start, stop, dora_task_rows_by_column(base_rows, delta_rows, magnitude, norms)
