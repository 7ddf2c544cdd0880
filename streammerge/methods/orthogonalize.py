"""DO-Merging step 1: nudge each task's factors so different tasks' factors become orthogonal.

Per module and separately for the A's (rows live in input space) and the B's (columns live in
output space), minimise (ALGORITHMS.md, DO-Merging step 1)::

    L = Σ_{i≠j} ‖(X_i+δ_i)(X_j+δ_j)ᵀ‖_F² / (‖X_i‖² ‖X_j‖²) + μ Σ_i ‖δ_i‖² / ‖X_i‖²

with ``X_i = A_i`` (``[r_i, d_in]``) or ``X_i = B_iᵀ`` (``[r_i, d_out]``), by Adam from δ = 0.
All tasks are stacked into one ``[Σr, d]`` matrix, so each step is two small GEMMs whatever T.

``cross_loss=unsquared`` replaces the cross term by ``Σ_{i≠j} ‖X̂_i X̂_jᵀ‖_F / (‖X_i‖ ‖X_j‖)`` — the
unsquared norm in which a third-party summary of the paper (themoonlight.io review of arXiv
2505.15875; the paper itself is not reachable here) writes DO-Merging's loss.  Its gradient does
not fade as the overlap shrinks (``2 C_ij X_j / ‖C_ij‖`` per pair instead of ``4 C_ij X_j``), so at
the same μ the search goes much further towards full orthogonality.  The normalisation by the
factors' norms is kept (it makes μ and lr scale-free, as for the squared loss).

**Defaults** (since 2026-12-03; ALGORITHMS.md's are ``cross_loss=squared, lr=1e-3, mu=1, max_delta=0.2,
on_max_delta=warn_skip``): ``cross_loss=unsquared, steps=200, lr=3e-2, mu=0.01, max_delta=1, on_max_delta=clip``.
On validation of both quality suites (benchmarks/quality/README.md, "New DO-Merging defaults") they beat
the spec's settings by 1.5 (decoder) and 1.6 (encoder) points, each at its best λ, in the same 200 Adam
steps, removing almost all of the factors' cross-Gram; the spec's reading stays one set of ``--param`` away.

Adam's step is about ``lr`` *per element*.  We therefore optimise ``P_i = δ_i / rms(X_i)``
(rms = ‖X_i‖_F / √numel): one step then moves ``‖δ_i‖/‖X_i‖`` by at most about ``lr``, for any
shape, so ``lr · steps`` bounds how far δ can go (the spec's ``1e-3 · 200 = 0.2`` matches its
``max_delta``).  (Read literally, "lr on δ/‖X_i‖" would move ``‖δ‖/‖X‖`` by ``lr·√numel`` per step:
0.25 for a 16×4096 A.)
The gradient is analytic (``∂L/∂X = 4 C X``, C = off-diagonal blocks of ``X Xᵀ``), so this
runs under ``torch.inference_mode`` and on any device.

Where δ is searched (``search_space``):

* ``rowspace`` (default): δ lies in the span of the stacked factors' rows.  With the thin SVD
  ``X = U Σ Vᵀ`` (``Vᵀ``: ``[Σr, d]``, orthonormal rows) we write ``X = (UΣ) Vᵀ`` and ``δ = Z Vᵀ``;
  Grams and norms are unchanged by ``Vᵀ``, so Adam runs on the ``[Σr, Σr]`` matrix ``Z`` and each
  step costs ``Σr³`` instead of ``Σr²·d``: 10–40× faster at d = 4096–14336.  The gradient
  ``4 C X`` always lies in that span, so no descent direction is lost; only Adam's per-element
  scaling differs (its units are ``1/√(r_i·Σr)`` of ``‖X_i‖``, so ``lr`` keeps its meaning: one
  step moves ``‖δ_i‖/‖X_i‖`` by at most about ``lr``).  The principal axes do not depend on the
  order of the tasks (a QR basis would, and would hand Adam structural zeros that its
  per-element normalisation blows up from rounding noise to full steps).
* ``full``: δ anywhere in ``[r_i, d]`` (the literal reading); Adam's per-element normalisation
  also moves δ out of the row span, which costs penalty and does not reduce the cross terms.

Measured (benchmarks/README.md §5): on random and overlapping factors the row-space search ends
0–5 % above the full search's loss and is 4–18× faster; on the quality benchmark's trained
adapters it removed less of the B factors' overlap than the full search, with no measurable
difference in accuracy (benchmarks/quality/README.md).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import StreamMergeError
from .base import DenseUpdate, LowRankUpdate, Param, TaskUpdate
from .lowrank import dense_factors

__all__ = ["ON_MAX_DELTA", "ORTHOGONALIZE_PARAMS", "OrthoSettings", "RowProblem", "SideResult", "orthogonalize_many",
           "orthogonalize_rows", "orthogonalize_updates", "orthogonalize_updates_many", "switch"]

ON_MAX_DELTA = ("warn_skip", "clip", "error")
SEARCH_SPACES = ("rowspace", "full")
SIDES = ("both", "A", "B")
CROSS_LOSSES = ("squared", "unsquared")
ADAM_BETAS = (0.9, 0.999)
SERIAL_MAX_ROWS = 256
"""Up to this Σr a CPU Adam step is a few µs of work per op: run it on one thread.  With several
OpenMP threads each tiny op is a parallel region whose barrier spins; when another process holds
a core, one descheduled thread stalls every op (measured: a 4 × r16 merge of the `small` preset
took 7.7 s on one thread and >100 s on two with two busy processes beside it)."""
ADAM_EPS = 1e-12
"""Far below torch's 1e-8: normalised gradients of nearly orthogonal factors are ~1e-7."""

ORTHOGONALIZE_PARAMS: tuple[Param, ...] = (
    Param("steps", int, 200, "Adam steps of the orthogonalization", minimum=0),
    Param("lr", float, 3e-2, "Adam learning rate on δ in units of rms(A_i) (resp. B_i)", minimum=0.0),
    Param("mu", float, 0.01, "weight μ of the ‖δ‖²/‖A‖² penalty", minimum=0.0),
    Param("max_delta", float, 1.0, "largest allowed ‖δ_i‖/‖A_i‖ (resp. B) per task", minimum=0.0),
    Param("on_max_delta", str, "clip",
          "when max_delta is exceeded: warn_skip (warn, keep that side's factors unchanged), "
          "clip (shrink δ_i to the bound) or error", choices=ON_MAX_DELTA),
    Param("svd_rank", int, 64, "rank k of the SVD factors orthogonalized for full fine-tunes", minimum=1),
    Param("search_space", str, "rowspace",
          "where δ is searched: rowspace (the span of the tasks' factor rows; Σr×Σr work per Adam step) "
          "or full (all of [r, d], the literal reading; d/Σr times the work)", choices=SEARCH_SPACES),
    Param("sides", str, "both", "which factors are orthogonalized: both, only the A's (input side) or only "
          "the B's (output side); the other side is left as trained", choices=SIDES),
    Param("cross_loss", str, "unsquared",
          "the cross term between tasks' factors: unsquared (Σ‖X̂_iX̂_jᵀ‖, the paper's loss as a third-party "
          "summary writes it) or squared (Σ‖X̂_iX̂_jᵀ‖², ALGORITHMS.md)", choices=CROSS_LOSSES),
)


def switch(default: bool) -> Param:
    """The ``orthogonalize`` on/off parameter with a method-specific default."""
    return Param("orthogonalize", bool, default, "orthogonalize the tasks' factors first (DO-Merging step 1)")


_DEFAULTS = {p.name: p.default for p in ORTHOGONALIZE_PARAMS}


@dataclass(frozen=True)
class OrthoSettings:
    """The orthogonalization parameters, resolved (defaults: ``ORTHOGONALIZE_PARAMS``')."""

    steps: int = _DEFAULTS["steps"]
    lr: float = _DEFAULTS["lr"]
    mu: float = _DEFAULTS["mu"]
    max_delta: float = _DEFAULTS["max_delta"]
    on_max_delta: str = _DEFAULTS["on_max_delta"]
    svd_rank: int = _DEFAULTS["svd_rank"]
    search_space: str = _DEFAULTS["search_space"]
    sides: str = _DEFAULTS["sides"]
    cross_loss: str = _DEFAULTS["cross_loss"]

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> OrthoSettings:
        """Pick this component's values out of a method's resolved parameters."""
        return cls(**{p.name: params[p.name] for p in ORTHOGONALIZE_PARAMS})


@dataclass
class SideResult:
    """The perturbed factors of one side (A or B) and what it took."""

    factors: list[torch.Tensor]
    cross_before: float
    cross_after: float
    delta_max: float
    skipped: bool
    steps: int


def _cross_norms(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``‖(X Xᵀ) ⊙ mask‖_F`` of each ``[n, d]`` matrix of a ``[G, n, d]`` batch."""
    return torch.linalg.vector_norm((x @ x.mT).mul_(mask), dim=(-2, -1))


def _cross_gradient(x: torch.Tensor, mask: torch.Tensor, blocks: torch.Tensor, cross_loss: str) -> torch.Tensor:
    """``∂/∂X`` of the cross term for a batch ``[G, n, k]`` of stacked factors.

    ``mask`` zeroes the diagonal blocks of ``X Xᵀ``; ``blocks`` (``[n, T]``, one-hot of each row's task)
    sums entries into per-pair blocks.  Squared: ``4 C X``; unsquared: ``2 (C ⊘ ‖C_ij‖) X``, each
    pair's block divided by its own Frobenius norm."""
    cross = (x @ x.mT).mul_(mask)
    if cross_loss == "squared":
        return (cross @ x).mul_(4)
    pair_norms = (blocks.mT @ cross.square() @ blocks).sqrt_()  # [G, T, T]
    per_entry = (blocks @ pair_norms @ blocks.mT).clamp_min_(torch.finfo(x.dtype).tiny)
    return (cross.div_(per_entry) @ x).mul_(2)


def _adam(x0: torch.Tensor, scale: torch.Tensor, mask: torch.Tensor, blocks: torch.Tensor,
          s: OrthoSettings) -> torch.Tensor:
    """Adam on ``P`` for ``X = x0 + P·scale`` (``scale``: the per-row unit of P); returns ``P``.

    ``x0`` is a batch ``[G, n, k]`` of independent problems: every op is one batched op, so G
    problems cost about what one does in per-op overhead (200 steps of ~10 tiny ops)."""
    b1, b2 = ADAM_BETAS
    p = torch.zeros_like(x0)
    m = torch.zeros_like(x0)
    v = torch.zeros_like(x0)
    penalty = (2 * s.mu) * scale * scale
    for t in range(1, s.steps + 1):
        x = torch.addcmul(x0, p, scale)
        grad = _cross_gradient(x, mask, blocks, s.cross_loss).mul_(scale).addcmul_(p, penalty)
        m.mul_(b1).add_(grad, alpha=1 - b1)
        v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        denom = v.sqrt().div_(math.sqrt(1 - b2 ** t)).add_(ADAM_EPS)
        p.addcdiv_(m, denom, value=-s.lr / (1 - b1 ** t))
    return p


@contextmanager
def _serial_on_cpu(x: torch.Tensor) -> Iterator[None]:
    """One intra-op thread for small CPU problems (see ``SERIAL_MAX_ROWS``)."""
    if x.device.type != "cpu" or x.shape[-2] > SERIAL_MAX_ROWS or torch.get_num_threads() == 1:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _search(x0: torch.Tensor, ranks: Sequence[int], rms_units: torch.Tensor, owner: torch.Tensor,
            mask: torch.Tensor, s: OrthoSettings) -> torch.Tensor:
    """Run Adam in the chosen search space on a batch ``[G, Σr, d]``; returns δ in units of ``‖X_i‖``."""
    n, d = x0.shape[-2:]
    blocks = torch.nn.functional.one_hot(owner, len(ranks)).to(x0.dtype)
    if s.search_space == "full" or n >= d:  # n ≥ d: the row span may be all of R^d already
        return _adam(x0, rms_units[owner][:, None], mask, blocks, s).mul_(rms_units[owner][:, None])
    units = torch.tensor([1 / math.sqrt(rank * n) for rank in ranks], device=x0.device)[owner][:, None]
    with _serial_on_cpu(x0):
        u, sigma, basis = _principal_axes(x0)  # x0 = (u σ) basis, basis: [G, n, d]
        z = _adam(u * sigma[..., None, :], units, mask, blocks, s)
    return (z * units) @ basis


def _principal_axes(x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The thin SVD ``x0 = u diag(σ) basis`` of wide ``[…, n, d]`` matrices (n < d), through a QR of ``x0ᵀ``
    and the SVD of its ``n × n`` triangular factor: ``x0ᵀ = q r``, ``r = w σ vh``, so ``u = vhᵀ`` and
    ``basis = (q w)ᵀ``.  The same factorization (backward stable, no squared condition number) at a
    quarter to a fifth of LAPACK's direct SVD time for d = 2048–8192 (measured on CPU; it dominated
    DO-Merging's cost per module)."""
    q, r = torch.linalg.qr(x0.mT)
    w, sigma, vh = torch.linalg.svd(r, full_matrices=False)
    return vh.mT, sigma, (q @ w).mT


def _enforce_bound(side: str, name: str, ratios: torch.Tensor, s: OrthoSettings) -> bool:
    """Apply ``on_max_delta``; True if this side must be left unchanged."""
    worst = float(ratios.max())
    if worst <= s.max_delta:
        return False
    message = (f"tensor {name!r}: orthogonalizing the {side} factors needs ‖δ‖/‖{side}‖ = {worst:.4g}, "
               f"above max_delta={s.max_delta}")
    if s.on_max_delta == "error":
        raise StreamMergeError(
            f"{message}; raise max_delta or mu, or set on_max_delta to warn_skip or clip")
    if s.on_max_delta == "warn_skip":
        warnings.warn(f"{message}; leaving the {side} factors unchanged", RuntimeWarning, stacklevel=4)
        return True
    return False  # "clip": the caller shrinks δ


@dataclass(frozen=True)
class RowProblem:
    """One orthogonalization problem: one side (A or B) of one tensor's task factors.

    Attributes:
        mats: one ``[r_i, d]`` matrix per task (``A_i``, or ``B_iᵀ``), same ``d``, fp32.
        side: ``"A"`` or ``"B"``, for stats and messages.
        name: tensor name, for messages.
    """

    mats: Sequence[torch.Tensor]
    side: str = "A"
    name: str = ""


def orthogonalize_rows(mats: Sequence[torch.Tensor], settings: OrthoSettings, side: str = "A",
                       name: str = "") -> SideResult:
    """Make the row spaces of different tasks' factor matrices (near) orthogonal.

    Args:
        mats: one ``[r_i, d]`` matrix per task (``A_i``, or ``B_iᵀ``), same ``d``, fp32.
        settings: steps, lr, μ and the ``max_delta`` policy.
        side: ``"A"`` or ``"B"``, for stats and messages.
        name: tensor name, for messages.

    Returns:
        The perturbed matrices ``X_i + δ_i`` (the inputs themselves when nothing is done) and
        the cross-Gram norm ``sqrt(Σ_{i≠j} ‖X_i X_jᵀ‖²)`` of the Frobenius-normalised factors
        before/after, max ``‖δ_i‖/‖X_i‖``, skip flag, steps run.

    Raises:
        StreamMergeError: if ``on_max_delta="error"`` and the bound is exceeded.
    """
    return orthogonalize_many([RowProblem(mats, side, name)], settings)[0]


def orthogonalize_many(problems: Sequence[RowProblem], settings: OrthoSettings) -> list[SideResult]:
    """``orthogonalize_rows`` of many problems; those with the same task ranks and width run as one batch.

    Each result equals the problem's own ``orthogonalize_rows`` up to floating-point reassociation
    (batched GEMMs may sum in another order); the problems of, e.g., every q_proj and o_proj A side of
    a model's layers then cost one problem's per-op overhead.
    """
    results: list[SideResult | None] = [None] * len(problems)
    groups: dict[tuple[Any, ...], list[tuple[int, list[int], list[float]]]] = {}
    for k, problem in enumerate(problems):
        mats = problem.mats
        norms = [float(torch.linalg.vector_norm(x)) for x in mats]
        active = [i for i, n in enumerate(norms) if n > 0 and mats[i].numel() > 0]  # B=0: untrained LoRA
        if len(active) < 2 or settings.steps == 0:
            results[k] = SideResult(list(mats), 0.0, 0.0, 0.0, False, 0)
            continue
        first = mats[active[0]]
        key = (tuple(mats[i].shape[0] for i in active), first.shape[1], first.device, first.dtype)
        groups.setdefault(key, []).append((k, active, norms))
    for members in groups.values():
        for k, result in zip([m[0] for m in members], _solve_group(problems, members, settings)):
            results[k] = result
    return results  # type: ignore[return-value]


def _solve_group(problems: Sequence[RowProblem], members: list[tuple[int, list[int], list[float]]],
                 settings: OrthoSettings) -> list[SideResult]:
    """One batched search for problems with the same active ranks and width."""
    first, first_active, _ = members[0]
    mats0 = problems[first].mats
    device = mats0[first_active[0]].device
    ranks = [mats0[i].shape[0] for i in first_active]
    x0 = torch.stack([torch.cat([problems[k].mats[i] / norms[i] for i in active]) for k, active, norms in members])
    owner = torch.repeat_interleave(torch.arange(len(ranks), device=device), torch.tensor(ranks, device=device))
    rms_units = torch.tensor([1 / math.sqrt(mats0[i].numel()) for i in first_active], device=device)
    mask = 1 - torch.block_diag(*[torch.ones(r, r, device=device) for r in ranks])
    before = _cross_norms(x0, mask).tolist()

    delta = _search(x0, ranks, rms_units, owner, mask, settings)  # δ_i / ‖X_i‖, stacked, per problem
    del x0
    ratios = torch.zeros(len(members), len(ranks), device=device).index_add_(
        1, owner, delta.square().sum(-1)).sqrt_()
    results = []
    for g, (k, active, norms) in enumerate(members):
        problem, row = problems[k], ratios[g]
        delta_max = float(row.max())
        if _enforce_bound(problem.side, problem.name, row, settings):
            results.append(SideResult(list(problem.mats), before[g], before[g], delta_max, True, settings.steps))
            continue
        over = row > settings.max_delta  # only possible here with on_max_delta="clip"
        shrink = torch.where(over, settings.max_delta / row.clamp_min(1e-30), torch.ones_like(row))
        step = delta[g].mul_(shrink[owner][:, None])
        delta_max = float((row * shrink).max())
        out = list(problem.mats)
        for i, rows in zip(active, step.split(ranks)):
            out[i] = problem.mats[i] + rows * norms[i]
        # Report the overlap of the factors as returned: renormalised, so shrinking them does not count.
        after = float(_cross_norms(torch.cat([out[i] / torch.linalg.vector_norm(out[i]) for i in active]), mask))
        results.append(SideResult(out, before[g], after, delta_max, False, settings.steps))
    return results


def orthogonalize_updates(updates: Sequence[TaskUpdate], settings: OrthoSettings,
                          name: str = "") -> tuple[list[TaskUpdate], dict[str, float]]:
    """Orthogonalize the A's and, separately, the B's of 2-D task updates.

    LoRA updates are perturbed factor by factor and stay low-rank.  A full fine-tune's
    ``τ_i`` is factored by a rank-``svd_rank`` SVD (``up = U√σ``, ``down = √σVᵀ``); its factors
    are perturbed the same way and the result is ``τ_i + B̂_i Â_i − B_i A_i`` (the SVD tail is kept).

    Returns:
        The new updates (input order) and stats ``ortho_cross_gram_{A,B}_{before,after}``,
        ``ortho_delta_{A,B}_max``, ``ortho_skipped_{A,B}`` (0/1) and ``ortho_steps``.
    """
    return orthogonalize_updates_many([updates], settings, [name])[0]


def orthogonalize_updates_many(tensors: Sequence[Sequence[TaskUpdate]], settings: OrthoSettings,
                               names: Sequence[str]) -> list[tuple[list[TaskUpdate], dict[str, float]]]:
    """``orthogonalize_updates`` of several tensors: all their A and B problems go through one
    ``orthogonalize_many`` call, so problems of equal shape and ranks are solved as one batch."""
    prepared = []
    problems: list[RowProblem] = []
    for updates, name in zip(tensors, names):
        factors = [u if isinstance(u, LowRankUpdate) else dense_factors(u.delta, settings.svd_rank)
                   for u in updates]
        # A task whose update is zero (an untrained LoRA has B = 0) has nothing to keep apart from.
        live = [i for i, f in enumerate(factors) if bool(f.up.any()) and bool(f.down.any())]
        downs = [factors[i].down for i in live]
        ups_t = [factors[i].up.T for i in live]
        prepared.append((updates, factors, live, downs, ups_t))
        problems += [RowProblem(downs, "A", name), RowProblem(ups_t, "B", name)]
    run = [settings.sides in ("both", p.side) for p in problems]  # the side not chosen stays as trained
    solved = iter(orthogonalize_many([p for p, r in zip(problems, run) if r], settings))
    sides = [next(solved) if r else SideResult(list(p.mats), 0.0, 0.0, 0.0, False, 0) for p, r in zip(problems, run)]
    return [_assemble(*p, sides[2 * k], sides[2 * k + 1]) for k, p in enumerate(prepared)]


def _assemble(updates: Sequence[TaskUpdate], factors: list[LowRankUpdate], live: list[int],
              downs: list[torch.Tensor], ups_t: list[torch.Tensor], a_side: SideResult,
              b_side: SideResult) -> tuple[list[TaskUpdate], dict[str, float]]:
    """One tensor's new updates and stats from its perturbed A and B factors."""
    result = list(updates)
    for k, i in enumerate(live):
        a, bt = a_side.factors[k], b_side.factors[k]
        if a is downs[k] and bt is ups_t[k]:
            continue  # untouched (one task, steps=0, or both sides skipped)
        update = updates[i]
        if isinstance(update, LowRankUpdate):
            result[i] = LowRankUpdate(up=bt.T, down=a)
        else:
            result[i] = DenseUpdate((update.delta - factors[i].dense()).addmm_(bt.T, a))
    stats: dict[str, float] = {}
    for label, side in (("A", a_side), ("B", b_side)):
        stats[f"ortho_cross_gram_{label}_before"] = side.cross_before
        stats[f"ortho_cross_gram_{label}_after"] = side.cross_after
        stats[f"ortho_delta_{label}_max"] = side.delta_max
        stats[f"ortho_skipped_{label}"] = float(side.skipped)
    stats["ortho_steps"] = float(max(a_side.steps, b_side.steps))
    return result, stats
