"""Peak RSS and wall time of streammerge against model depth and number of adapters.

  layers    1b-shaped models (hidden 2048, full 128256-row embeddings) with 4 / 8 / 16 layers,
            4 rank-16 adapters: the memory line must be flat in layers
  adapters  the 1b preset with 1 / 2 / 4 / 8 rank-16 adapters

Cold cache, every point once per repetition (interleaved), medians; the least-squares slope
of peak RSS per layer is printed next to the model's own growth per layer.

    .venv/bin/python benchmarks/bench_scaling.py --reps 3
    .venv/bin/python benchmarks/bench_scaling.py --series layers --method do_merging --reps 1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import benchlib as b

LAYERS = (4, 8, 16)
ADAPTERS = (1, 2, 4, 8)


def layer_model(layers: int) -> Path:
    return b.ensure_model("1b" if layers == 16 else f"1b-L{layers}", "1b", None if layers == 16 else layers)


def slope(xs: list[float], ys: list[float]) -> float:
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else 0.0


def run(series: list[str], method: str, reps: int) -> dict[str, Any]:
    points: list[tuple[str, int, Path, int]] = []  # (series, x, model, adapters)
    if "layers" in series:
        points += [("layers", n, layer_model(n), 4) for n in LAYERS]
    if "adapters" in series:
        points += [("adapters", k, layer_model(16), k) for k in ADAPTERS]
    models = {p[2] for p in points}
    adapters = {m: b.ensure_adapters(m, max(p[3] for p in points if p[2] == m)) for m in models}
    floors: dict[str, list[float]] = {str(m): [] for m in models}
    runs: dict[tuple[str, int], list[b.Run]] = {(s, x): [] for s, x, _, _ in points}
    for rep in range(reps):
        for m in sorted(models):
            floors[str(m)].append(b.measure_floor(m)["seconds"])
        for s, x, m, k in points:
            r = b.run_streammerge(f"scaling-{s}{x}-{method}-{rep}", m, [("adapter", p) for p in adapters[m][:k]],
                                  method)
            runs[(s, x)].append(r)
            print(f"rep {rep + 1} {s}={x}: {r.wall_s} s, {r.maxrss_mib} MiB (load {r.load_avg[0]})",
                  file=sys.stderr, flush=True)
    rows = []
    for s, x, m, k in points:
        ok = [r for r in runs[(s, x)] if r.rc == 0]
        floor = b.median(floors[str(m)])
        wall = b.median(r.wall_s for r in ok) if ok else None
        rows.append({"series": s, "x": x, "model": str(m), "model_bytes": b.tree_bytes([m]), "adapters": k,
                     "wall_s": wall, "cpu_s": b.median(r.cpu_s for r in ok) if ok else None,
                     "floor_s": floor, "wall_over_floor": round(wall / floor, 2) if wall else None,
                     "peak_rss_mib": b.median(r.maxrss_mib for r in ok) if ok else None,
                     "runs": [r.record() for r in runs[(s, x)]]})
    fits = {}
    for s in series:
        pts = [r for r in rows if r["series"] == s and r["peak_rss_mib"] is not None]
        if len(pts) >= 2:
            fits[s] = {"rss_mib_per_step": round(slope([r["x"] for r in pts], [r["peak_rss_mib"] for r in pts]), 2),
                       "model_mib_per_step": round(slope([r["x"] for r in pts],
                                                         [r["model_bytes"] / b.MIB for r in pts]), 1),
                       "wall_s_per_step": round(slope([r["x"] for r in pts], [r["wall_s"] for r in pts]), 2)}
    return {"method": method, "rows": rows, "fits": fits}


def table(res: dict[str, Any]) -> str:
    header = ["series", "x", "model size", "adapters", "wall", "CPU", "floor", "wall / floor", "peak RSS", "n"]
    rows = [[r["series"], r["x"], f"{r['model_bytes'] / b.GIB:.2f} GiB", r["adapters"], b.fmt_s(r["wall_s"]),
             b.fmt_s(r["cpu_s"]), b.fmt_s(r["floor_s"]), b.fmt_ratio(r["wall_over_floor"]),
             b.fmt_mib(r["peak_rss_mib"]), sum(1 for x in r["runs"] if x["rc"] == 0)] for r in res["rows"]]
    fits = "\n".join(f"- {s}: peak RSS {f['rss_mib_per_step']:+.1f} MiB per {s[:-1]} "
                     f"(the model grows {f['model_mib_per_step']:.0f} MiB per {s[:-1]}); "
                     f"wall {f['wall_s_per_step']:+.2f} s per {s[:-1]}" for s, f in res["fits"].items())
    return b.markdown_table(header, rows) + "\n\nLeast-squares slopes:\n" + fits


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--series", action="append", choices=("layers", "adapters"), help="default both")
    parser.add_argument("--method", default="task_arithmetic")
    parser.add_argument("--reps", type=int, default=3)
    b.add_source_argument(parser)
    args = parser.parse_args()
    b.use_source(args.source)
    machine = b.machine()
    res = run(args.series or ["layers", "adapters"], args.method, args.reps)
    text = table(res)
    doc = {"benchmark": "scaling", "command": b.invocation(), "machine": machine, **res, "table": text}
    path = b.save_results(f"scaling-{args.method}", doc)
    print(f"{b.machine_line(machine)}\n`{doc['command']}`\n\n{text}\n\nJSON: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
