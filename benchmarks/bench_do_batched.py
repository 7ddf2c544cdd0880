"""DO-Merging's orthogonalization per module vs batched, CPU time, on a preset's real module shapes.

For ``--layers`` layers of a preset (q/k/v/o/gate/up/down, ``--adapters`` random rank-16 LoRAs each,
B scaled like tools/synthetic.py's adapters), in this process:

- per module, principal axes by LAPACK's SVD of the wide ``[Σr, d]`` stack (the code before batching);
- per module, principal axes by a QR of the stack and an SVD of its ``Σr × Σr`` factor (now);
- batched: the modules in the engine's windows (``LOOKAHEAD_BYTES`` of factors, tensors in the
  order a shard stores them), each window one ``orthogonalize_updates_many`` call.

CPU seconds per module (``time.process_time``: robust on a shared machine), and the largest
relative difference between the batched and the per-module results (the same problems).

    .venv/bin/python benchmarks/bench_do_batched.py --preset 1b --layers 4
    .venv/bin/python benchmarks/bench_do_batched.py --preset 8b --layers 2
"""

from __future__ import annotations

import argparse
import sys
import time

import benchlib as b

sys.path.insert(0, str(b.REPO))
import streammerge  # noqa: E402,F401  (first: it sets OMP_WAIT_POLICY before torch loads, as the CLI does)
import torch  # noqa: E402
from streammerge.methods import LowRankUpdate  # noqa: E402
from streammerge.methods import orthogonalize as ortho  # noqa: E402
from streammerge.planning.budget import LOOKAHEAD_BYTES  # noqa: E402
from tools.synthetic import PRESETS, tensor_shapes  # noqa: E402

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def modules(preset: str, layers: int, adapters: int, rank: int) -> list[tuple[str, list[LowRankUpdate]]]:
    shapes = tensor_shapes(PRESETS[preset])
    names = sorted(n for n in shapes if any(f".{t}." in n for t in TARGETS)
                   and int(n.split(".")[2]) < layers)  # the order a shard stores them in
    g = torch.Generator().manual_seed(0)
    return [(n, [LowRankUpdate(up=torch.randn(shapes[n][0], rank, generator=g) * 0.01,
                               down=torch.randn(rank, shapes[n][1], generator=g) / rank ** 0.5)
                 for _ in range(adapters)]) for n in names]


def windows(mods: list[tuple[str, list[LowRankUpdate]]]) -> list[list[int]]:
    """Module indices grouped as the worker's lookahead groups them (bytes of factors per window)."""
    out: list[list[int]] = [[]]
    size = 0
    for k, (_, updates) in enumerate(mods):
        nbytes = 4 * sum(u.up.numel() + u.down.numel() for u in updates)
        if out[-1] and size + nbytes > LOOKAHEAD_BYTES:
            out.append([])
            size = 0
        out[-1].append(k)
        size += nbytes
    return out


def lapack_axes(x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.linalg.svd(x0, full_matrices=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="1b", choices=sorted(PRESETS))
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()
    machine = b.machine()
    mods = modules(args.preset, args.layers, args.adapters, args.rank)
    settings = ortho.OrthoSettings()
    load = b.loadavg()

    def per_module() -> tuple[float, list]:
        start = time.process_time()
        out = [ortho.orthogonalize_updates(u, settings, n) for n, u in mods]
        return (time.process_time() - start) / len(mods), out

    principal = ortho._principal_axes
    ortho._principal_axes = lapack_axes
    try:
        lapack_s, _ = per_module()
    finally:
        ortho._principal_axes = principal
    qr_s, single = per_module()
    groups = windows(mods)
    start = time.process_time()
    batched = []
    for group in groups:
        batched += ortho.orthogonalize_updates_many([mods[k][1] for k in group], settings, [mods[k][0] for k in group])
    batched_s = (time.process_time() - start) / len(mods)
    diff = max(float((a.dense() - c.dense()).abs().max() / a.dense().abs().max())
               for (ours, _), (ref, _) in zip(batched, single) for a, c in zip(ref, ours))
    rows = [[f"{args.preset}, {args.layers} layers × 7 modules, {args.adapters} × r{args.rank}",
             f"{1000 * lapack_s:.1f} ms", f"{1000 * qr_s:.1f} ms", f"{1000 * batched_s:.1f} ms",
             f"{len(mods) / len(groups):.1f}", b.fmt_ratio(lapack_s / batched_s), f"{diff:.1e}", load[0]]]
    text = b.markdown_table(["modules", "per module, LAPACK SVD (before)", "per module, QR + small SVD",
                             "batched (engine windows)", "modules per window", "speed-up", "max rel. diff",
                             "load"], rows)
    print(f"{b.machine_line(machine)}\n`{b.invocation()}` — CPU seconds per module, torch threads "
          f"{torch.get_num_threads()}\n\n{text}")
    b.save_results(f"do-batched-{args.preset}", {"command": b.invocation(), "machine": machine, "table": text,
                                                  "lapack_s": lapack_s, "qr_s": qr_s, "batched_s": batched_s,
                                                  "windows": len(groups), "modules": len(mods), "max_rel_diff": diff,
                                                  "load_avg": load})
    return 0


if __name__ == "__main__":
    sys.exit(main())
