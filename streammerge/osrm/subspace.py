"""OSRM subspace math: pure functions of tensors, no files, no models.

For a target module with inputs ``x ∈ R[d]`` a LoRA update ``ΔW = s B A`` shifts the output
of another task's token by ``s B A x``.  OSRM chooses ``A`` (``r × d``, ``A Aᵀ = I``) to
minimise the energy other tasks' features leave in it, ``E‖A x‖² = tr(A S Aᵀ)``, whose
minimiser is the ``r`` eigenvectors of ``S`` with the smallest eigenvalues.

``S`` is the *uncentred* second moment ``E[x xᵀ]`` by default: the output shift a task
suffers is ``s B A x`` for its raw features ``x``, mean included, and in LLMs the mean is a
large, shared part of every token's features; centring (``center=True``, an ablation) drops
``μ μᵀ`` and lets the mean leak through ``A`` on every token.  Each other task counts
equally (its moment is normalised by its own token count), so a task with long documents
does not outweigh a task with short ones.

Everything is computed in float64.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import InputError

__all__ = [
    "ModuleStats",
    "Subspace",
    "second_moment",
    "pooled_second_moment",
    "smallest_eigenvectors",
    "covariance_subspace",
    "means_subspace",
    "captured_energy",
    "project_factors",
]

VARIANTS = ("covariance", "means")


@dataclass
class ModuleStats:
    """Running input statistics of one module on one task.

    Attributes:
        count: number of (non-padding) tokens seen.
        sum_x: ``Σ x`` (float64, ``[d]``).
        sum_xxT: ``Σ x xᵀ`` (float64, ``[d, d]``), or None when only first moments were collected.
    """

    count: int
    sum_x: torch.Tensor
    sum_xxT: torch.Tensor | None = None

    @property
    def dim(self) -> int:
        return int(self.sum_x.shape[0])

    def mean(self) -> torch.Tensor:
        """The mean feature ``μ = Σx / n``."""
        return self.sum_x.double() / max(self.count, 1)


def second_moment(stats: ModuleStats, center: bool = False) -> torch.Tensor:
    """``E[x xᵀ]`` of one task (``E[x xᵀ] − μ μᵀ`` with ``center``), float64 ``[d, d]``."""
    if stats.sum_xxT is None:
        raise InputError("these statistics hold first moments only; collect them again with the covariance variant")
    if stats.count <= 0:
        raise InputError("no tokens were seen for this module; the task data is empty")
    moment = stats.sum_xxT.double() / stats.count
    if center:
        mu = stats.mean()
        moment = moment - torch.outer(mu, mu)
    return (moment + moment.T) / 2


def pooled_second_moment(stats: Sequence[ModuleStats], center: bool = False) -> torch.Tensor:
    """The mean of the tasks' (normalised) second moments: every task weighs the same."""
    if not stats:
        raise InputError("OSRM needs the statistics of at least one other task")
    total = second_moment(stats[0], center)
    for s in stats[1:]:
        total = total + second_moment(s, center)
    return total / len(stats)


@dataclass(frozen=True)
class Subspace:
    """An OSRM subspace for one module.

    Attributes:
        A: ``[r, d]`` float64 with orthonormal rows: the LoRA ``A`` initialisation.
        eigenvalues: the ``r`` eigenvalues (ascending) of the matrix ``A`` was taken from.
        null_dim: dimension of that matrix's (numerical) null space.
    """

    A: torch.Tensor
    eigenvalues: torch.Tensor
    null_dim: int

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def short_of_null(self) -> int:
        """How many rows of ``A`` had to come from outside the null space (0 when it was big enough)."""
        return max(0, self.rank - self.null_dim)


def _canonical_signs(A: torch.Tensor) -> torch.Tensor:
    """Flip rows so each one's largest-magnitude entry is positive (eigenvector signs are arbitrary)."""
    pivot = A.gather(1, A.abs().argmax(1, keepdim=True))
    return (A * torch.where(pivot < 0, -1.0, 1.0).to(A.dtype)).contiguous()


def _check_rank(rank: int, dim: int) -> None:
    if not 0 < rank <= dim:
        raise InputError(f"the LoRA rank must be between 1 and the module's input size {dim}; got rank {rank}")


def smallest_eigenvectors(matrix: torch.Tensor, rank: int) -> Subspace:
    """The ``rank`` eigenvectors of a symmetric PSD matrix with the smallest eigenvalues (fp64 ``eigh``)."""
    _check_rank(rank, matrix.shape[0])
    sym = matrix.double()
    sym = (sym + sym.T) / 2
    values, vectors = torch.linalg.eigh(sym)  # ascending
    scale = values.abs().max().clamp_min(torch.finfo(torch.float64).tiny)
    null_dim = int((values <= scale * sym.shape[0] * torch.finfo(torch.float64).eps).sum())
    return Subspace(A=_canonical_signs(vectors[:, :rank].T), eigenvalues=values[:rank].clone(), null_dim=null_dim)


def covariance_subspace(others: Sequence[ModuleStats], rank: int, center: bool = False) -> Subspace:
    """The paper's OSRM subspace: smallest eigenvectors of the other tasks' pooled second moment."""
    return smallest_eigenvectors(pooled_second_moment(others, center), rank)


def means_subspace(others: Sequence[ModuleStats], rank: int) -> Subspace:
    """The cheap variant: an orthonormal basis of the null space of the other tasks' mean features.

    With ``T`` other tasks the stacked means ``M ∈ R[T, d]`` leave a null space of dimension
    ``d − rank(M)``.  Where ``rank`` exceeds it, the remaining rows are the right singular
    vectors of ``M`` with the smallest singular values (the least-used directions) and
    ``Subspace.short_of_null`` says how many there are; nothing fails.
    """
    if not others:
        raise InputError("OSRM needs the statistics of at least one other task")
    means = torch.stack([s.mean() for s in others])
    _check_rank(rank, means.shape[1])
    # Full SVD: rows of vh past the singular values span the null space; among the others the
    # last ones have the smallest singular values, so the last `rank` rows are the best choice.
    _u, sing, vh = torch.linalg.svd(means, full_matrices=True)
    dim = means.shape[1]
    tol = sing.max().clamp_min(torch.finfo(torch.float64).tiny) * max(means.shape) * torch.finfo(torch.float64).eps
    matrix_rank = int((sing > tol).sum())
    eigen = torch.zeros(dim, dtype=torch.float64)
    eigen[: sing.shape[0]] = sing**2
    A = _canonical_signs(vh[dim - rank:].flip(0))  # null-space rows first, then smallest singular values
    return Subspace(A=A, eigenvalues=eigen[dim - rank:].flip(0).clone(), null_dim=dim - matrix_rank)


def captured_energy(A: torch.Tensor, moment: torch.Tensor) -> float:
    """``tr(A S Aᵀ) / tr(S)``: the fraction of the features' energy that ``A`` passes.

    0 means ``A`` is blind to these features; a random ``r``-dimensional subspace passes ``r/d``.
    """
    A = A.double().to(moment.device)
    total = float(torch.trace(moment))
    if total <= 0:
        return 0.0
    return float(torch.einsum("rd,de,re->", A, moment.double(), A)) / total


def project_factors(A: torch.Tensor, B: torch.Tensor, A_osrm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Post-hoc OSRM: ``A ← A_osrm``, ``B ← (s B A) A_osrmᵀ / s``.

    The update becomes ``ΔW P`` with ``P = A_osrmᵀ A_osrm`` the projector onto the OSRM
    subspace.  The scale ``s`` cancels, and ``B (A A_osrmᵀ)`` is computed through the
    small ``r × r'`` core, never through a dense ``d_o × d_i`` product.

    Returns:
        ``(A_osrm, B')`` in float64.
    """
    core = A.double() @ A_osrm.double().T
    return A_osrm.double().clone(), B.double() @ core
