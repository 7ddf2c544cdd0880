"""The GPU check (run by ``benchmarks/gpu_check.sh``): everything a GPU machine must show, in one run.

1. the ``gpu``-marked tests;
2. Task Arithmetic, DO-Merging and TIES (4 × r16 adapters) on the ``8b`` preset and the 70B
   slice with ``--device cuda``: wall, wall / floor (read+write of the base, cold cache), peak
   RSS, peak GPU memory (``cuda_peak.py``);
3. when two GPUs exist, a 2-rank NCCL ``torchrun`` merge (TA on the 8b preset), its wall time
   and whether its output is byte-identical to the single-process CUDA run.

Every step has a share of a time budget (default 450 s of the 8 minutes) and is recorded as
``not run: time budget`` once the budget is spent.  ``--dry-run``: the same steps on CPU with the
``tiny`` preset and a 2-rank gloo run, so the script itself is tested without a GPU.
Results: ``OUT/gpu_check.json`` and ``OUT/gpu_check.md``.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import benchlib as b

METHODS = ("task_arithmetic", "do_merging", "ties")
PRESETS = {"8b": ("8b", None), "70b-slice2": ("70b-slice", 2)}
DRY_PRESETS = {"tiny": ("tiny", None)}
NOT_MEASURED = "not measured"


class Budget:
    """Seconds left of the whole check."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gpu_count(python: str) -> int:
    text = subprocess.run([python, "-c", "import torch; print(torch.cuda.device_count())"],
                            capture_output=True, text=True).stdout.strip()
    return int(text) if text.isdigit() else 0


def gpu_tests(out: Path, budget: Budget, python: str) -> dict[str, Any]:
    """``pytest -m gpu``: its exit code and summary line (every test skips without CUDA)."""
    run = b.run_measured("gpu-tests", [python, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests"],
                         out / "logs" / "gpu-tests.log", timeout=max(10.0, min(150.0, budget.left())))
    lines = [l for l in Path(run.log).read_text(errors="replace").splitlines() if l.strip()]
    return {"rc": run.rc, "wall_s": run.wall_s, "summary": lines[-1] if lines else "", "log": run.log}


def merge_command(model: Path, adapters: list[Path], method: str, out: Path, device: str) -> list[str]:
    return [*b.streammerge_command(model, [("adapter", p) for p in adapters], method, out), "--device", device]


def merges(out: Path, presets: dict[str, tuple[str, int | None]], device: str, budget: Budget,
           keep: set[tuple[str, str]]) -> list[dict[str, Any]]:
    """Each method on each preset, cold cache, against the read+write floor of the same base."""
    rows = []
    for name, (preset, layers) in presets.items():
        if budget.left() < 30:
            rows += [{"preset": name, "method": m, "status": "not run: time budget"} for m in METHODS]
            continue
        model = b.ensure_model(name, preset, layers)
        adapters = b.ensure_adapters(model, 4)
        floor = b.measure_floor(model)
        for method in METHODS:
            if budget.left() < 20:
                rows.append({"preset": name, "method": method, "status": "not run: time budget"})
                continue
            dest = b.SCRATCH / f"gpu-check-{name}-{method}"
            b.remove(dest)
            b.evict([model, *adapters])
            run = b.run_measured(f"{name}-{method}", merge_command(model, adapters, method, dest, device),
                                 out / "logs" / f"{name}-{method}.log", timeout=max(10.0, budget.left() - 10))
            text = Path(run.log).read_text(errors="replace")
            summary = b.last_json_object(text)
            peak_gpu = next((json.loads(l.removeprefix("CUDA_PEAK ")) for l in text.splitlines()
                             if l.startswith("CUDA_PEAK ")), None)
            rows.append({
                "preset": name, "method": method, "device": device, "status": "ok" if run.rc == 0 else f"rc {run.rc}",
                "model_bytes": b.tree_bytes([model]), "wall_s": run.wall_s, "engine_s": summary.get("seconds"),
                "floor_s": floor["seconds"], "wall_over_floor": round(run.wall_s / floor["seconds"], 3),
                "peak_rss_mib": run.maxrss_mib, "cli_peak_rss_mib": summary.get("peak_rss_mib"),
                "peak_gpu": peak_gpu if peak_gpu is not None else NOT_MEASURED, "log": run.log})
            if (name, method) not in keep:
                b.remove(dest)
    return rows


def two_ranks(out: Path, preset: str, device: str, budget: Budget, python: str) -> dict[str, Any]:
    """A 2-rank torchrun merge (TA) against the single-process output kept by ``merges``."""
    backend = "nccl" if device == "cuda" else "gloo"
    if budget.left() < 40:
        return {"backend": backend, "status": "not run: time budget"}
    name, (synthetic_preset, layers) = preset, (PRESETS | DRY_PRESETS)[preset]
    model = b.ensure_model(name, synthetic_preset, layers)
    adapters = b.ensure_adapters(model, 4)
    single = b.SCRATCH / f"gpu-check-{name}-task_arithmetic"
    dest = b.SCRATCH / f"gpu-check-{name}-task_arithmetic-2ranks"
    b.remove(dest)
    b.evict([model, *adapters])
    merge = merge_command(model, adapters, "task_arithmetic", dest, device)
    launcher = [python, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                "--master-port", str(_free_port())]
    run = b.run_measured(f"{name}-2ranks", [*launcher, *merge[1:]],  # "-m streammerge …" or "cuda_peak.py …"
                         out / "logs" / f"{name}-2ranks.log", timeout=max(10.0, budget.left() - 5))
    same = None
    if run.rc == 0 and single.is_dir():
        weights = sorted(p.name for p in single.glob("*.safetensors"))
        same = bool(weights) and all(filecmp.cmp(single / n, dest / n, shallow=False) for n in weights)
    b.remove(dest)
    return {"backend": backend, "preset": name, "status": "ok" if run.rc == 0 else f"rc {run.rc}",
            "wall_s": run.wall_s, "peak_rss_mib_all_ranks": run.sampled_peak_mib,
            "weights_identical_to_single_process": same, "log": run.log}


def table(doc: dict[str, Any]) -> str:
    rows = []
    for r in doc["merges"]:
        if r["status"] != "ok":
            rows.append([r["preset"], r["method"], r["status"], "—", "—", "—", "—"])
            continue
        gpu = r["peak_gpu"]
        rows.append([f"{r['preset']} ({r['model_bytes'] / b.GIB:.1f} GiB)", r["method"], b.fmt_s(r["wall_s"]),
                     b.fmt_s(r["floor_s"]), b.fmt_ratio(r["wall_over_floor"]), b.fmt_mib(r["peak_rss_mib"]),
                     b.fmt_mib(gpu["allocated_mib"]) if isinstance(gpu, dict) else gpu])
    text = b.markdown_table(["model", "method (4 × r16)", "wall", "floor", "wall / floor", "peak RSS", "peak GPU"],
                            rows)
    d = doc["two_ranks"]
    text += (f"\n\n2 ranks ({d['backend']}): {d['status']}"
             + (f", {b.fmt_s(d['wall_s'])}, weights identical to one process: "
                f"{d['weights_identical_to_single_process']}" if d.get("wall_s") is not None else ""))
    t = doc["gpu_tests"]
    return text + f"\n\n`pytest -m gpu`: rc {t.get('rc')}, {t.get('summary', t.get('status'))}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("gpu_check_out"))
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny preset, 2-rank gloo: tests the script")
    parser.add_argument("--budget-s", type=float, default=450.0, help="seconds for every step together")
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    budget = Budget(args.budget_s)
    python = str(b.MAIN_PY)
    device = "cpu" if args.dry_run else "cuda"
    gpus = gpu_count(python)
    doc: dict[str, Any] = {"check": "gpu", "dry_run": args.dry_run, "device": device, "gpus": gpus,
                           "machine": b.machine(), "command": " ".join(sys.argv)}
    if not args.dry_run and gpus == 0:
        doc["status"] = "no CUDA device: every GPU row is " + NOT_MEASURED
        doc |= {"gpu_tests": {"status": NOT_MEASURED}, "merges": [], "two_ranks": {"backend": "nccl",
                                                                                "status": NOT_MEASURED}}
    else:
        doc["gpu_tests"] = gpu_tests(out, budget, python)
        presets = DRY_PRESETS if args.dry_run else PRESETS
        pair, rest = next(iter(presets)), dict(list(presets.items())[1:])
        pairing = args.dry_run or gpus >= 2
        # The pair preset first, then the 2-rank run against its kept TA output, which is deleted before the
        # other presets are generated (the GPU machine's disk holds ~64 GiB).
        doc["merges"] = merges(out, {pair: presets[pair]}, device, budget,
                               keep={(pair, "task_arithmetic")} if pairing else set())
        if pairing:
            doc["two_ranks"] = two_ranks(out, pair, device, budget, python)
        else:
            doc["two_ranks"] = {"backend": "nccl", "status": f"not run: {gpus} GPU (needs 2)"}
        b.remove(b.SCRATCH / f"gpu-check-{pair}-task_arithmetic")
        doc["merges"] += merges(out, rest, device, budget, keep=set())
    doc["seconds"] = round(args.budget_s - budget.left(), 1)
    doc["table"] = table(doc) if doc["merges"] or doc["gpu_tests"].get("rc") is not None else doc["status"]
    (out / "gpu_check.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    (out / "gpu_check.md").write_text(f"{b.machine_line(doc['machine'])}\n\n{doc['table']}\n")
    print(doc["table"])
    failed = [r for r in doc["merges"] if r["status"] not in ("ok",) and not r["status"].startswith("not run")]
    return 1 if failed or doc["two_ranks"].get("weights_identical_to_single_process") is False else 0


if __name__ == "__main__":
    sys.exit(main())
