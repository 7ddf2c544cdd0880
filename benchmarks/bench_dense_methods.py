"""Dense methods on one large tensor: the whole-tensor ``merge`` against the row-block form.

Each dense method on a 14336×4096 tensor (a Llama-3-8B MLP matrix) with 4 rank-16 LoRA inputs
and with 2 dense inputs (task vectors between bf16 models), whole tensor vs row blocks
(``methods.rows.merge_by_blocks``, ``--block-rows`` rows per block), each case in its own child
process on one torch thread: wall time of the merge, peak RSS above the inputs (the child's
high-water mark minus its RSS once the inputs are built), and whether the two results are
bit-identical (checksums of the merged update).

    .venv/bin/python benchmarks/bench_dense_methods.py [--methods ties,dare_ties] [--rows 14336 --cols 4096]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

METHODS = ("ties", "magnitude_prune", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties")
KINDS = ("lora4x16", "dense2")
PATHS = ("whole", "rows")


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / (1 << 20)


def child(method: str, kind: str, path: str, rows: int, cols: int, block_rows: int) -> dict:
    import torch

    from streammerge.methods import DenseUpdate, LowRankUpdate, MergeInputs, get_method
    from streammerge.methods.rows import merge_by_blocks

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    base = torch.randn(rows, cols, generator=g).bfloat16().float()
    if kind == "lora4x16":
        updates = tuple(LowRankUpdate(0.01 * torch.randn(rows, 16, generator=g), torch.randn(16, cols, generator=g))
                        for _ in range(4))
    else:
        updates = tuple(DenseUpdate((base + 0.02 * torch.randn(rows, cols, generator=g)).bfloat16().float() - base)
                        for _ in range(2))
    m = get_method(method)
    params = m.resolve_params({})
    inputs = MergeInputs("w", base, updates, (1.0,) * len(updates), torch.Generator().manual_seed(1))
    before = _rss_mib()
    start = time.perf_counter()
    if path == "whole":
        merged = m.merge(inputs, params).update.dense()
    else:
        assert m.rows is not None
        merged = merge_by_blocks(m.rows, inputs, params, block_rows)
    wall = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    digest = hashlib.sha256(merged.contiguous().view(torch.int32).numpy().tobytes()).hexdigest()[:16]
    return {"method": method, "kind": kind, "path": path, "wall_s": wall, "peak_above_inputs_mib": peak - before,
            "inputs_mib": before, "sha": digest}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--rows", type=int, default=14336)
    parser.add_argument("--cols", type=int, default=4096)
    parser.add_argument("--block-rows", type=int, default=1024, help="rows per block (a multiple of the grid)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--child", nargs=3, metavar=("METHOD", "KIND", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args.rows, args.cols, args.block_rows)))
        return
    results = []
    for method in args.methods.split(","):
        for kind in args.kinds.split(","):
            for path in PATHS:
                command = [sys.executable, __file__, "--rows", str(args.rows), "--cols", str(args.cols),
                           "--block-rows", str(args.block_rows), "--child", method, kind, path]
                out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
                results.append(json.loads(out.strip().splitlines()[-1]))
                print(json.dumps(results[-1]), file=sys.stderr)
    print(f"machine: {platform.node()} {platform.machine()}, 1 torch thread; tensor {args.rows}x{args.cols}, "
          f"blocks of {args.block_rows} rows; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print("| method | inputs | whole s | rows s | rows/whole | whole peak MiB | rows peak MiB | bit-identical |")
    print("|---|---|---:|---:|---:|---:|---:|---|")
    for i in range(0, len(results), 2):
        w, r = results[i], results[i + 1]
        ratio = r["wall_s"] / w["wall_s"]
        print(f"| {w['method']} | {w['kind']} | {w['wall_s']:.2f} | {r['wall_s']:.2f} | {ratio:.2f} "
              f"| {w['peak_above_inputs_mib']:.0f} | {r['peak_above_inputs_mib']:.0f} | {w['sha'] == r['sha']} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
