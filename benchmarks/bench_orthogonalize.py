"""DO-Merging's orthogonalization: row-space search vs full search, time and the loss reached.

For stacks of T factor matrices ``[r, d]`` with real Llama widths (4096, 14336, 1024) and a
shared component of given strength (0 = independent random factors, as LoRA A's from different
seeds; 0.3 / 0.5 = overlapping, as B's trained on related tasks), runs
``orthogonalize_rows`` with the default settings (200 Adam steps, lr 1e-3, μ 1) in both search
spaces, in this process, and reports the median wall time of ``--reps`` runs and the spec's loss
(cross terms + μ·penalty, ALGORITHMS.md DO-Merging step 1) at the end.

    .venv/bin/python benchmarks/bench_orthogonalize.py --reps 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import benchlib as b

sys.path.insert(0, str(b.REPO))
import streammerge  # noqa: E402,F401  (first: it sets OMP_WAIT_POLICY before torch loads, as the CLI does)
import torch  # noqa: E402
from streammerge.methods.orthogonalize import OrthoSettings, orthogonalize_rows  # noqa: E402

CASES = ((4, 16, 4096, 0.0), (4, 16, 4096, 0.3), (4, 16, 14336, 0.5), (4, 16, 1024, 0.3), (8, 64, 4096, 0.3))


def factors(tasks: int, rank: int, width: int, shared: float, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    common = torch.randn(rank, width, generator=g)
    return [(1 - shared) * torch.randn(rank, width, generator=g) + shared * common for _ in range(tasks)]


def loss(before: Sequence[torch.Tensor], after: Sequence[torch.Tensor], mu: float) -> tuple[float, float]:
    """(Σ_{i≠j} ‖X̂_i X̂_jᵀ‖² / (‖X_i‖²‖X_j‖²), μ Σ ‖δ_i‖² / ‖X_i‖²)."""
    norms = [float(x.norm()) for x in before]
    cross = sum(float((after[i] @ after[j].T).square().sum()) / (norms[i] ** 2 * norms[j] ** 2)
                for i in range(len(after)) for j in range(len(after)) if i != j)
    penalty = mu * sum(float((a - x).square().sum()) / n ** 2 for x, a, n in zip(before, after, norms))
    return cross, penalty


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    m = b.machine()
    rows, results = [], []
    for tasks, rank, width, shared in CASES:
        mats = factors(tasks, rank, width, shared, seed=width + tasks)
        by_space = {}
        for space in ("full", "rowspace"):
            settings = OrthoSettings(search_space=space)
            times = []
            for _ in range(args.reps):
                start = time.perf_counter()
                side = orthogonalize_rows(mats, settings)
                times.append(time.perf_counter() - start)
            cross, penalty = loss(mats, side.factors, settings.mu)
            by_space[space] = {"seconds": statistics.median(times), "cross": cross, "penalty": penalty,
                               "loss": cross + penalty, "cross_gram_before": side.cross_before,
                               "cross_gram_after": side.cross_after, "delta_max": side.delta_max}
        full, row = by_space["full"], by_space["rowspace"]
        results.append({"tasks": tasks, "rank": rank, "width": width, "shared": shared, **{
            f"{space}_{k}": v for space, d in by_space.items() for k, v in d.items()}})
        rows.append([f"{tasks} × [{rank}, {width}]", shared, b.fmt_s(full["seconds"]), b.fmt_s(row["seconds"]),
                     b.fmt_ratio(full["seconds"] / row["seconds"]), f"{full['loss']:.4g}", f"{row['loss']:.4g}",
                     f"{100 * (row['loss'] / full['loss'] - 1):+.1f} %",
                     f"{row['cross_gram_before']:.3f} → {full['cross_gram_after']:.3f} / {row['cross_gram_after']:.3f}",
                     f"{full['delta_max']:.3f} / {row['delta_max']:.3f}"])
    print(b.machine_line(m))
    print(f"`{b.invocation()}` — torch threads {torch.get_num_threads()}, median of {args.reps}\n")
    print(b.markdown_table(["factors (T × [r, d])", "shared", "full: time", "rowspace: time", "speed-up",
                            "full: loss", "rowspace: loss", "loss Δ", "cross-Gram before → after (full / row)",
                            "max ‖δ‖/‖X‖ (full / row)"], rows))
    path = b.save_results("orthogonalize", {"command": b.invocation(), "machine": m, "results": results})
    print(f"\nJSON: {path}")


if __name__ == "__main__":
    main()
