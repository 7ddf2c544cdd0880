"""The same streammerge merge under process-level knobs, interleaved: evidence for engine changes.

Variants (environment only; the code is unchanged):
  default      torch's default intra-op threads (= cores)
  omp1         OMP_NUM_THREADS=1: one compute thread, the writer thread gets the other core
  malloc       glibc keeps freed large blocks (no mmap/munmap per tensor → no page faults per block)
  omp1+malloc  both
  thp          THP_MEM_ALLOC_ENABLE=1 (torch asks for transparent huge pages)

    .venv/bin/python benchmarks/bench_knobs.py --preset 1b --method task_arithmetic --reps 2
    .venv/bin/python benchmarks/bench_knobs.py --preset small --method do_merging --variant default --variant omp1
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import benchlib as b
from bench_streammerge import PRESETS, model_for


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="1b")
    parser.add_argument("--method", default="task_arithmetic")
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--variant", action="append", choices=sorted(b.VARIANTS))
    parser.add_argument("--reps", type=int, default=2)
    b.add_source_argument(parser)
    args = parser.parse_args()
    b.use_source(args.source)
    machine = b.machine()
    model = model_for(args.preset)
    inputs = [("adapter", p) for p in b.ensure_adapters(model, args.adapters)]
    variants = args.variant or ["default", "omp1", "malloc", "omp1+malloc"]
    floors: list[dict[str, Any]] = []
    runs: dict[str, list[b.Run]] = {v: [] for v in variants}
    for rep in range(args.reps):
        floors.append(b.measure_floor(model))
        print(f"rep {rep + 1}: floor {floors[-1]['seconds']} s", file=sys.stderr, flush=True)
        order = variants[rep % len(variants):] + variants[:rep % len(variants)]  # rotate: no fixed position
        for v in order:
            label = f"knobs-{args.preset}-{args.method}-{v}-{rep}"
            out = b.SCRATCH / f"out-{label}"
            b.remove(out)
            b.evict([model, *(p for _, p in inputs)])
            r = b.run_measured(label, b.streammerge_command(model, inputs, args.method, out),
                               b.BENCH_OUT / "logs" / f"{label}.log", env=b.VARIANTS[v])
            b.remove(out)
            runs[v].append(r)
            print(f"  {v}: rc {r.rc} {r.wall_s} s wall, {r.cpu_s} s CPU, {r.maxrss_mib} MiB, load {r.load_avg[0]}",
                  file=sys.stderr, flush=True)
    base = b.median(r.wall_s for r in runs[variants[0]] if r.rc == 0)
    rows, results = [], []
    for v in variants:
        ok = [r for r in runs[v] if r.rc == 0]
        wall = b.median(r.wall_s for r in ok) if ok else None
        cpu = b.median(r.cpu_s for r in ok) if ok else None
        peak = max((r.maxrss_mib for r in ok), default=None)
        results.append({"variant": v, "env": b.VARIANTS[v], "wall_s": wall, "cpu_s": cpu, "peak_rss_mib": peak,
                        "runs": [r.record() for r in runs[v]]})
        rows.append([v, " ".join(f"{k}={val}" for k, val in b.VARIANTS[v].items()) or "—", b.fmt_s(wall),
                     b.fmt_s(cpu), b.fmt_ratio(wall / base if wall else None), b.fmt_mib(peak), len(ok)])
    floor = b.median(f["seconds"] for f in floors)
    text = b.markdown_table(["variant", "environment", "wall (median)", "CPU", f"vs {variants[0]}", "peak RSS", "n"],
                            rows) + f"\n\nfloor (same run): {b.fmt_s(floor)}"
    doc = {"benchmark": "knobs", "command": b.invocation(), "machine": machine, "preset": args.preset,
           "method": args.method, "floors": floors, "floor_s": floor, "results": results, "table": text}
    path = b.save_results(f"knobs-{args.preset}-{args.method}", doc)
    print(f"{b.machine_line(machine)}\n`{doc['command']}`\n\n{text}\n\nJSON: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
