"""Dense methods through the whole engine (two passes over row blocks) against the read+write floor.

For one synthetic preset: the floor, then ``streammerge merge`` with TIES, DARE-TIES, DARE-linear,
Breadcrumbs, Breadcrumbs-TIES and magnitude prune over 4 rank-16 adapters, and TIES / DARE-TIES over
2 full fine-tunes; wall, wall / floor (same repetition), peak RSS of the process tree, and ``plan``'s
predicted peak beside it.  Cold page cache unless ``--warm``.

    .venv/bin/python benchmarks/bench_dense_engine.py --preset 1b --reps 1
    .venv/bin/python benchmarks/bench_dense_engine.py --preset 70b-slice --finetunes-only [--methods ties]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from typing import Any

import benchlib as b
from bench_streammerge import PRESETS, model_for

LORA_METHODS = ("ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "magnitude_prune")
FINETUNE_METHODS = ("ties", "dare_ties")
TARGETS = {"ties": 3.0, "dare_ties": 4.0, "dare_linear": 4.0, "breadcrumbs": 4.0, "breadcrumbs_ties": 4.0}
PEAK_TARGET_MIB = 1.5 * 1024


def run(preset: str, reps: int, warm: bool, finetunes_only: bool, methods: tuple[str, ...] | None = None) -> dict[str, Any]:
    model = model_for(preset)
    cases: list[tuple[str, str, list[tuple[str, Any]]]] = []
    if not finetunes_only:
        lora = [("adapter", p) for p in b.ensure_adapters(model, 4)]
        cases += [(m, "4 × r16 LoRA", lora) for m in LORA_METHODS]
    tunes = [("model", p) for p in b.ensure_finetunes(model, 2)]
    cases += [(m, "2 full fine-tunes", tunes) for m in FINETUNE_METHODS]
    cases = [c for c in cases if methods is None or c[0] in methods]
    predicted = {(m, k): b.predicted_peak_mib(model, inputs, m) for m, k, inputs in cases}
    floors, runs = [], {(m, k): [] for m, k, _ in cases}
    for rep in range(reps):
        floors.append(b.measure_floor(model, warm))
        print(f"rep {rep + 1}: floor {floors[-1]['seconds']} s", file=sys.stderr, flush=True)
        for method, kind, inputs in cases:
            r = b.run_streammerge(f"dense-{preset}-{method}-{kind[:1]}-{rep}", model, inputs, method, warm=warm)
            runs[(method, kind)].append(r)
            print(f"  {method} [{kind}]: {r.wall_s} s, {r.maxrss_mib} MiB (rc {r.rc})", file=sys.stderr, flush=True)
    rows = []
    for method, kind, _ in cases:
        ok = [r for r in runs[(method, kind)] if r.rc == 0]
        per_rep = [r.wall_s / f["seconds"] for r, f in zip(runs[(method, kind)], floors) if r.rc == 0]
        peak = max((r.maxrss_mib for r in ok), default=None)
        rows.append({"method": method, "inputs": kind, "n": len(ok),
                     "wall_s": b.median(r.wall_s for r in ok) if ok else None,
                     "cpu_s": b.median(r.cpu_s for r in ok) if ok else None,
                     "wall_over_floor": round(statistics.median(per_rep), 2) if per_rep else None,
                     "peak_rss_mib": peak, "predicted_peak_mib": predicted[(method, kind)],
                     "load_avg": [r.load_avg[0] for r in runs[(method, kind)]],
                     "runs": [r.record() for r in runs[(method, kind)]]})
    return {"preset": preset, "model_bytes": b.tree_bytes([model]), "floor_s": b.median(f["seconds"] for f in floors),
            "floor_load_avg": [f["load_avg"] for f in floors],
            "cache": "warm" if warm else "cold", "methods": rows}


def table(res: dict[str, Any]) -> str:
    header = ["model", "method", "inputs", "wall", "wall / floor", "target", "CPU (user+sys)", "peak RSS",
              "plan predicted", "predicted / measured", "load avg"]
    rows = []
    for m in res["methods"]:
        target = TARGETS.get(m["method"]) if m["inputs"].startswith("4") else 2.0
        peak, pred = m["peak_rss_mib"], m["predicted_peak_mib"]
        rows.append([f"{res['preset']} ({res['model_bytes'] / b.GIB:.1f} GiB)", m["method"], m["inputs"],
                     b.fmt_s(m["wall_s"]), b.fmt_ratio(m["wall_over_floor"]), f"≤ {target}×" if target else "—",
                     b.fmt_s(m["cpu_s"]),
                     b.fmt_mib(peak) + (" (over 1.5 GiB)" if peak and peak > PEAK_TARGET_MIB else ""),
                     b.fmt_mib(pred), b.fmt_ratio(round(pred / peak, 2) if pred and peak else None),
                     ", ".join(str(x) for x in m["load_avg"])])
    return b.markdown_table(header, rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="1b", choices=sorted(PRESETS))
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--warm", action="store_true")
    parser.add_argument("--finetunes-only", action="store_true", help="only the full fine-tune rows")
    parser.add_argument("--methods", help="comma-separated subset of the methods (default: all)")
    b.add_source_argument(parser)
    args = parser.parse_args()
    b.use_source(args.source)
    res = run(args.preset, args.reps, args.warm, args.finetunes_only,
              tuple(args.methods.split(",")) if args.methods else None)
    print(b.machine_line(b.machine()))
    print(f"floor {res['floor_s']} s (load avg {res['floor_load_avg']})")
    print(table(res))
    b.save_results(f"dense-engine-{args.preset}", {"invocation": b.invocation(), "machine": b.machine(), **res})
    return 0


if __name__ == "__main__":
    sys.exit(main())
