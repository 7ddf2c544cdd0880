"""streammerge against mergekit and PEFT on the same inputs, in the same run.

Comparisons (each repetition runs every tool once, cold cache, outputs deleted in between):
  ft-ta     2 full fine-tunes, Task Arithmetic: ``streammerge --model`` vs ``mergekit-yaml``
            (merge_method task_arithmetic, weights 1, bf16)
  ft-ties   the same with TIES (density 0.2, weights 1; mergekit normalizes = our disjoint mean)
  lora-ta   4 rank-16 adapters, Task Arithmetic: ``streammerge --adapter`` vs mergekit's LoRA path
            (``base+adapter`` model references: PEFT merge_and_unload of each adapter into a cached
            full model, then task_arithmetic) vs PEFT (add_weighted_adapter "cat" +
            merge_and_unload + save_pretrained, benchmarks/peft_merge.py)
Peers do not fsync their output; "+ fsync" adds the time to make it durable afterwards, as
streammerge and the floor do.  Each tool's output is compared with streammerge's on a few
tensors (max |difference| next to max |update|) before it is deleted.

    .venv/bin/python benchmarks/bench_peers.py --preset 1b --reps 3
    .venv/bin/python benchmarks/bench_peers.py --preset 8b --reps 1 --only lora-ta --tool streammerge --tool peft
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import psutil

import benchlib as b
from bench_streammerge import PRESETS, model_for

COMPARISONS = ("ft-ta", "ft-ties", "lora-ta")
TOOLS = {"ft-ta": ("streammerge", "mergekit"), "ft-ties": ("streammerge", "mergekit"),
         "lora-ta": ("streammerge", "mergekit", "peft")}
MERGEKIT_METHOD = {"ft-ta": "task_arithmetic", "ft-ties": "ties", "lora-ta": "task_arithmetic"}
OURS_METHOD = {"ft-ta": "task_arithmetic", "ft-ties": "ties", "lora-ta": "task_arithmetic"}
MERGEKIT_PARAMS = {"ft-ties": {"density": 0.2}}
MEMORY_HEADROOM_MIB = 1536  # a peer is stopped when the machine's available memory falls below this


def mergekit_config(base: Path, models: list[str], comparison: str) -> str:
    doc = {"merge_method": MERGEKIT_METHOD[comparison], "base_model": str(base), "dtype": "bfloat16",
           "models": [{"model": m, "parameters": {"weight": 1.0, **MERGEKIT_PARAMS.get(comparison, {})}}
                      for m in models]}
    return json.dumps(doc, indent=2)  # JSON is YAML


def compare(ours: Path, theirs: Path, base: Path, names: list[str]) -> dict[str, Any]:
    """max |theirs − ours| and max |ours − base| on ``names`` (fp32), read with safetensors."""
    from safetensors import safe_open
    import torch

    def tensor(root: Path, name: str) -> torch.Tensor | None:
        for f in b.weight_files(root):
            with safe_open(str(f), "pt") as handle:
                if name in handle.keys():
                    return handle.get_tensor(name).float()
        return None

    diff, update = 0.0, 0.0
    for name in names:
        a, c, w0 = tensor(ours, name), tensor(theirs, name), tensor(base, name)
        if a is None or c is None or w0 is None:
            return {"error": f"{name} missing"}
        diff = max(diff, float((c - a).abs().max()))
        update = max(update, float((a - w0).abs().max()))
    return {"max_abs_diff": diff, "max_abs_update": update, "tensors": names}


def run_tool(tool: str, comparison: str, base: Path, inputs: list[Path], rep: int,
             cache: Path) -> tuple[b.Run, Path]:
    label = f"peers-{comparison}-{tool}-{rep}"
    out = b.SCRATCH / f"out-{label}"
    b.remove(out)
    b.remove(cache)
    b.evict([base, *inputs])
    log = b.BENCH_OUT / "logs" / f"{label}.log"
    if tool == "streammerge":
        kind = "adapter" if comparison.startswith("lora") else "model"
        cmd = b.streammerge_command(base, [(kind, p) for p in inputs], OURS_METHOD[comparison], out)
    elif tool == "mergekit":
        refs = [f"{base}+{p}" if comparison.startswith("lora") else str(p) for p in inputs]
        config = b.SCRATCH / f"{label}.yaml"
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(mergekit_config(base, refs, comparison))
        cmd = [str(b.PEERS_BIN / "mergekit-yaml"), str(config), str(out), "--no-copy-tokenizer",
               "--lora-merge-cache", str(cache), "--quiet"]
    else:
        cmd = [str(b.MAIN_PY), str(b.REPO / "benchmarks" / "peft_merge.py"), "--base", str(base),
               *(x for p in inputs for x in ("--adapter", str(p))), "--out", str(out)]
    run = b.run_measured(label, cmd, log, min_available_mib=MEMORY_HEADROOM_MIB)
    text = Path(run.log).read_text(errors="replace")
    if tool == "streammerge":
        run.summary = {k: v for k, v in b.last_json_object(text).items() if k != "method_stats"}
    elif run.rc == 0:
        run.summary["fsync_s"] = round(b.fsync_tree(out), 3)
    if run.rc != 0:
        print(f"  !! {label} failed (rc {run.rc}); see {run.log}:\n{text[-1500:]}", file=sys.stderr)
    return run, out


def check_names(model: Path, comparison: str) -> list[str]:
    layers = json.loads((model / "config.json").read_text())["num_hidden_layers"]
    names = ["model.layers.0.mlp.down_proj.weight", f"model.layers.{layers - 1}.self_attn.q_proj.weight"]
    return names + (["model.embed_tokens.weight"] if comparison.startswith("ft") else [])


def run(preset: str, reps: int, comparisons: list[str], tools: list[str] | None) -> dict[str, Any]:
    model = model_for(preset)
    inputs = {"ft": b.ensure_finetunes(model, 2) if any(c.startswith("ft") for c in comparisons) else [],
              "lora": b.ensure_adapters(model, 4) if "lora-ta" in comparisons else []}
    cache = b.SCRATCH / "mergekit-lora-cache"
    floors, runs = [], {c: {t: [] for t in TOOLS[c] if not tools or t in tools} for c in comparisons}
    checks: dict[str, dict[str, Any]] = {}
    for rep in range(reps):
        floors.append(b.measure_floor(model))
        print(f"rep {rep + 1}/{reps}: floor {floors[-1]['seconds']} s", file=sys.stderr, flush=True)
        for comparison in comparisons:
            ins = inputs[comparison.split("-")[0]]
            outs: dict[str, Path] = {}
            for tool in runs[comparison]:
                r, out = run_tool(tool, comparison, model, ins, rep, cache)
                runs[comparison][tool].append(r)
                outs[tool] = out
                extra = f" + {r.summary['fsync_s']} s fsync" if "fsync_s" in r.summary else ""
                print(f"  {comparison} {tool}: rc {r.rc} {r.wall_s} s{extra}, {r.cpu_s} s CPU, "
                      f"{r.maxrss_mib} MiB (load {r.load_avg[0]})", file=sys.stderr, flush=True)
                if tool != "streammerge":
                    ours = outs.get("streammerge")
                    if rep == 0 and r.rc == 0 and ours is not None and ours.exists():
                        checks[f"{comparison}/{tool}"] = compare(ours, out, model, check_names(model, comparison))
                    b.remove(out)
                b.remove(cache)
            for out in outs.values():
                b.remove(out)
    rows = []
    for comparison, by_tool in runs.items():
        ours = [r for r in by_tool.get("streammerge", []) if r.rc == 0]
        ours_wall = b.median(r.wall_s for r in ours) if ours else None
        ours_rss = max((r.maxrss_mib for r in ours), default=None)
        for tool, rs in by_tool.items():
            ok = [r for r in rs if r.rc == 0]
            wall = b.median(r.wall_s for r in ok) if ok else None
            synced = b.median(r.wall_s + r.summary.get("fsync_s", 0.0) for r in ok) if ok else None
            rss = max((r.maxrss_mib for r in ok), default=None)
            rows.append({
                "comparison": comparison, "tool": tool, "n": len(ok), "failed": len(rs) - len(ok),
                "wall_s": wall, "wall_with_fsync_s": synced, "cpu_s": b.median(r.cpu_s for r in ok) if ok else None,
                "peak_rss_mib": rss,
                "wall_ratio_to_ours": round(synced / ours_wall, 2) if synced and ours_wall else None,
                "rss_ratio_to_ours": round(rss / ours_rss, 2) if rss and ours_rss else None,
                "check": checks.get(f"{comparison}/{tool}"), "runs": [r.record() for r in rs],
            })
    return {"preset": preset, "model": str(model), "model_bytes": b.tree_bytes([model]),
            "floor_s": b.median(f["seconds"] for f in floors), "floors": floors, "rows": rows}


def table(results: list[dict[str, Any]]) -> str:
    header = ["model", "merge", "tool", "wall", "wall + fsync", "CPU", "peak RSS", "peer / ours: time",
              "peer / ours: RSS", "max |peer − ours| (max |update|)", "n"]
    rows = []
    for res in results:
        for r in res["rows"]:
            check = r["check"]
            diff = (f"{check['max_abs_diff']:.2g} ({check['max_abs_update']:.2g})"
                    if check and "max_abs_diff" in check else "—")
            rows.append([f"{res['preset']} (floor {b.fmt_s(res['floor_s'])})", r["comparison"], r["tool"],
                         b.fmt_s(r["wall_s"]) if r["n"] else "failed", b.fmt_s(r["wall_with_fsync_s"]),
                         b.fmt_s(r["cpu_s"]), b.fmt_mib(r["peak_rss_mib"]),
                         "—" if r["tool"] == "streammerge" else b.fmt_ratio(r["wall_ratio_to_ours"]),
                         "—" if r["tool"] == "streammerge" else b.fmt_ratio(r["rss_ratio_to_ours"]),
                         diff, r["n"]])
    return b.markdown_table(header, rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", action="append", choices=sorted(PRESETS), help="repeatable (default 1b)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--only", action="append", choices=COMPARISONS, help="repeatable (default all)")
    parser.add_argument("--tool", action="append", choices=("streammerge", "mergekit", "peft"),
                        help="repeatable (default all); keep streammerge for the ratios")
    b.add_source_argument(parser)
    args = parser.parse_args()
    b.use_source(args.source)
    machine = b.machine()
    machine["available_memory_gib"] = round(psutil.virtual_memory().available / b.GIB, 1)
    machine["peers"] = b.peer_versions()
    results = [run(p, args.reps, args.only or list(COMPARISONS), args.tool) for p in (args.preset or ["1b"])]
    text = table(results)
    doc = {"benchmark": "peers", "command": b.invocation(), "machine": machine, "results": results, "table": text}
    path = b.save_results("peers-" + "-".join(args.preset or ["1b"]), doc)
    print(f"{b.machine_line(machine)}\n`{doc['command']}`\n\n{text}\n\nJSON: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
