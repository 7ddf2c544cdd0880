"""LoRA extraction: ``streammerge extract`` against ``mergekit-extract-lora`` on the same full fine-tune.

The fine-tune is synthetic and mostly low-rank, as a real one is (``tools/synthetic.py finetune
--rank R``: a rank-R change of every matrix plus noise at a tenth of its entries).  Both tools
extract rank K from every matrix but the embeddings and ``lm_head`` (ours leaves them out by
default, mergekit is given ``-e 'embed_tokens|lm_head'``), each in its own child process, cold
cache, one after the other.  Per module, the script measures the relative Frobenius error
``‖ΔW − s·B·A‖ / ‖ΔW‖`` of each adapter against the files (``ΔW = FT − B`` in fp32, the adapter's
scaling from its config), and the optimum: the exact rank-K SVD tail.  mergekit does not fsync;
"+ fsync" is the time to make its output durable afterwards.

    STREAMMERGE_BENCH_DATA=/tmp/h14/bench .venv/bin/python benchmarks/bench_extract.py --preset small --rank 16
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

import psutil

import benchlib as b

PRESETS: dict[str, tuple[str, int | None]] = {"small": ("small", None), "1b-4": ("1b", 4)}  # -> (preset, layers)
FT_RANK = 8
FT_STD = 0.002
EXCLUDE = "embed_tokens|lm_head"


def inputs_for(preset: str) -> tuple[Path, Path]:
    """The bf16 base and its low-rank synthetic fine-tune (generated once under MODELS)."""
    synthetic_preset, layers = PRESETS[preset]
    base = b.ensure_model(preset, synthetic_preset, layers)
    tune = b.MODELS / f"{preset}-ftlr{FT_RANK}"
    if not (tune / ".complete").is_file():
        b.remove(tune)
        b.synthetic("finetune", "--model", str(base), "--out", str(tune), "--seed", "1", "--std", str(FT_STD),
                    "--rank", str(FT_RANK))
        (tune / ".complete").touch()
    return base, tune


_OPTIMUM: dict[str, float] = {}  # module → exact rank-K error (the same for every tool)


def errors(adapter: Path, base: Path, tune: Path, rank: int) -> dict[str, Any]:
    """Per-module relative error of ``adapter`` against FT − base, and the exact rank-``rank`` optimum."""
    import torch

    sys.path.insert(0, str(b.SRC))
    from streammerge.inputs.lora import load_lora_adapter
    from streammerge.io.reader import CheckpointReader, open_checkpoint

    base_layout, tune_layout = open_checkpoint(base), open_checkpoint(tune)
    problems: list[str] = []
    parsed = load_lora_adapter(adapter, base_layout.tensor_names, problems)
    if problems:
        raise SystemExit(f"{adapter}: {problems}")
    ours, best = [], []
    factors = CheckpointReader(parsed.weights)
    with CheckpointReader(base_layout) as w0, CheckpointReader(tune_layout) as ft:
        for m in parsed.modules:
            delta = ft.read(m.target, torch.float32) - w0.read(m.target, torch.float32)
            approx = factors.read(m.b_key, torch.float32) @ factors.read(m.a_key, torch.float32) * m.scale
            total = float(delta.double().square().sum())
            ours.append(float((delta - approx).double().square().sum() / total) ** 0.5)
            if m.target not in _OPTIMUM:
                s = torch.linalg.svdvals(delta.double())
                _OPTIMUM[m.target] = float((s[rank:] ** 2).sum() / (s ** 2).sum()) ** 0.5
            best.append(_OPTIMUM[m.target])
    factors.close()
    return {"modules": len(ours), "mean_error": statistics.fmean(ours), "max_error": max(ours),
            "optimum_mean_error": statistics.fmean(best),
            "worst_excess": max(e / o - 1 for e, o in zip(ours, best)),
            "modules_to_save": len(parsed.tensors)}


def run(preset: str, rank: int, reps: int, tools: list[str]) -> dict[str, Any]:
    base, tune = inputs_for(preset)
    commands = {
        "streammerge": [str(b.MAIN_PY), "-m", "streammerge", "extract", "--base", str(base), "--model", str(tune),
                        "--rank", str(rank), "--device", "cpu", "--no-progress", "--out"],
        "mergekit": [str(b.PEERS_BIN / "mergekit-extract-lora"), "--model", str(tune), "--base-model", str(base),
                     "--max-rank", str(rank), "-e", EXCLUDE, "--quiet", "--out-path"],
    }
    runs: dict[str, list[dict[str, Any]]] = {t: [] for t in tools}
    quality: dict[str, dict[str, Any]] = {}
    for rep in range(reps):
        for tool in tools:
            out = b.SCRATCH / f"extract-{tool}"
            b.remove(out)
            b.evict([base, tune])
            label = f"extract-{preset}-{tool}-{rep}"
            measured = b.run_measured(label, [*commands[tool], str(out)], b.BENCH_OUT / "logs" / f"{label}.log",
                                      min_available_mib=1536)
            record = measured.record()
            if measured.rc != 0:
                print(f"  !! {label} failed (rc {measured.rc}); see {measured.log}", file=sys.stderr)
            else:
                record["fsync_s"] = round(b.fsync_tree(out), 3) if tool == "mergekit" else 0.0
                record["output_bytes"] = b.tree_bytes([out])
                if tool not in quality:
                    quality[tool] = errors(out, base, tune, rank)
            runs[tool].append(record)
            b.remove(out)
    return {"preset": preset, "rank": rank, "ft_rank": FT_RANK, "input_bytes": b.tree_bytes([base]),
            "runs": runs, "quality": quality}


def table(result: dict[str, Any]) -> str:
    rows = []
    ours = b.median(r["wall_s"] for r in result["runs"].get("streammerge", []) if r["rc"] == 0)
    for tool, runs in result["runs"].items():
        ok = [r for r in runs if r["rc"] == 0]
        if not ok:
            rows.append([tool, "failed", "", "", "", "", "", ""])
            continue
        wall = b.median(r["wall_s"] for r in ok)
        fsync = b.median(r["fsync_s"] for r in ok)
        q = result["quality"][tool]
        rows.append([tool, b.fmt_s(wall) + (f" (+ fsync {b.fmt_s(fsync)})" if fsync else ""),
                     b.fmt_ratio((wall + fsync) / ours) if ours else "—",
                     b.fmt_mib(max(r["maxrss_mib"] for r in ok)), q["modules"],
                     f"{q['mean_error']:.4f} / {q['max_error']:.4f}", f"{q['optimum_mean_error']:.4f}",
                     f"{q['worst_excess'] * 100:+.2f} %"])
    return b.markdown_table(["tool", "wall", "vs ours", "peak RSS", "modules", "rel. error mean / max",
                             "optimum mean", "worst module vs optimum"], rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--tool", action="append", choices=("streammerge", "mergekit"), help="default both")
    b.add_source_argument(parser)
    args = parser.parse_args()
    b.use_source(args.source)
    machine = b.machine()
    machine["available_memory_gib"] = round(psutil.virtual_memory().available / b.GIB, 1)
    machine["peers"] = b.peer_versions()
    result = run(args.preset, args.rank, args.reps, args.tool or ["streammerge", "mergekit"])
    text = table(result)
    doc = {"benchmark": "extract", "command": b.invocation(), "machine": machine, "result": result, "table": text}
    path = b.save_results(f"extract-{args.preset}", doc)
    loads = sorted({tuple(r["load_avg"]) for runs in result["runs"].values() for r in runs})
    print(f"{b.machine_line(machine)}\n`{doc['command']}`\nload averages at the starts: {loads}\n\n{text}\n\nJSON: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
