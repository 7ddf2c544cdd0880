"""Where a streammerge merge spends its time: py-spy samples of every thread, by category.

Runs ``streammerge merge`` (cold cache) under ``py-spy record --threads --idle --nonblocking``
and sorts every sample of the merge thread and of the writer thread into read + conversion,
GEMM, cast, orthogonalization, other method algebra, write, checksum, write-back, waiting,
start-up … by the innermost streammerge frame and its source line.  A second table gives the
cost of the elementary operations on this machine (64 MiB blocks), which explains the first.

    .venv/bin/pip install py-spy
    .venv/bin/python benchmarks/profile_merge.py --preset 1b --method task_arithmetic
    .venv/bin/python benchmarks/profile_merge.py --preset 1b --method do_merging --env OMP_NUM_THREADS=1
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import benchlib as b
from bench_streammerge import PRESETS, model_for

PY_SPY = b.MAIN_PY.parent / "py-spy"
THREADS = {"MainThread": "merge thread", "streammerge-writer": "writer thread"}

# (file, function, text in the source line or "", category); the first match from the innermost frame wins.
RULES: tuple[tuple[str, str, str, str], ...] = (
    ("orthogonalize.py", "", "", "orthogonalization (Adam on factors)"),
    ("decouple.py", "", "", "method: decouple / low-rank algebra"),
    ("lowrank.py", "", "", "method: decouple / low-rank algebra"),
    ("base.py", "stack_low_rank", "", "method: decouple / low-rank algebra"),
    ("sparsify.py", "", "", "method: dense deltas, trim, elect (TIES)"),
    ("consensus.py", "", "", "method: dense deltas, trim, elect (TIES)"),
    ("common.py", "", "", "method: dense deltas, trim, elect (TIES)"),
    ("staging.py", "load", "", "read + bf16→fp32 (page faults, conversion)"),
    ("staging.py", "unload", "", "cast fp32→bf16 (into a host buffer)"),
    ("staging.py", "empty", "", "cast fp32→bf16 (into a host buffer)"),
    ("worker.py", "_merged_rows", "addmm_", "GEMM  W0[rows] += L[rows] @ R"),
    ("worker.py", "_merged_rows", ".clone()", "copy of a base block"),
    ("worker.py", "_merged_rows", "add_(", "add a dense delta"),
    ("reader.py", "stored_rows", "", "read + bf16→fp32 (page faults, conversion)"),
    ("reader.py", "read_rows", "", "read + bf16→fp32 (page faults, conversion)"),
    ("reader.py", "copy_range", "", "byte copy of untouched tensors"),
    ("reader.py", "_release", "", "read: madvise release"),
    ("worker.py", "_load", "isfinite", "finite check of inputs"),
    ("worker.py", "_load", "", "read adapter factors"),
    ("worker.py", "_blocks", "addmm_", "GEMM  W0[rows] += L[rows] @ R"),
    ("worker.py", "_blocks", ".to(out_dtype", "cast fp32→bf16 (+ fresh block)"),
    ("worker.py", "_blocks", ".clone()", "copy of a base block"),
    ("worker.py", "_blocks", "add_(", "add a dense delta"),
    ("kinds.py", "_difference_update", "", "task vector (fine-tune − base)"),
    ("worker.py", "_base", "", "read whole base tensor (fp32)"),
    ("writer.py", "_put", "_sha.update", "checksum (SHA-256)"),
    ("writer.py", "_put", "_file.write", "write()"),
    ("writer.py", "_put", "write(", "write()"),
    ("writer.py", "_write_back", "", "write-back (fdatasync + fadvise)"),
    ("writer.py", "commit", "", "write-back (fdatasync + fadvise)"),
    ("writer.py", "tensor_bytes", "", "write(): byte view of a block"),
    ("threading.py", "wait", "", "waiting (queue / event)"),
    ("queue.py", "", "", "waiting (queue / event)"),
)


def source_line(cache: dict[str, list[str]], path: str, line: int) -> str:
    if path not in cache:
        try:
            cache[path] = Path(path).read_text().splitlines()
        except OSError:
            cache[path] = []
    lines = cache[path]
    return lines[line - 1] if 0 < line <= len(lines) else ""


def parse_frame(frame: str) -> tuple[str, str, int]:
    """``func (path:line)`` → (func, path, line)."""
    if "(" not in frame or not frame.endswith(")"):
        return frame, "", 0
    func, loc = frame[:-1].split(" (", 1)
    path, _, line = loc.rpartition(":")
    return func.strip(), path, int(line) if line.isdigit() else 0


def categorize(frames: list[str], cache: dict[str, list[str]], main_thread: bool) -> str:
    parsed = [parse_frame(f) for f in frames]
    if main_thread and not any(func.endswith("run_plan") for func, _, _ in parsed):
        return "start-up, planning, model card (outside run_plan)"
    for func, path, line in reversed(parsed):
        text = source_line(cache, path, line)
        for file, function, needle, category in RULES:
            if path.endswith(file) and (not function or func.endswith(function)) and (not needle or needle in text):
                return category
    return "other (python / torch glue)"


def thread_name(frame: str) -> str | None:
    for name, label in THREADS.items():
        if frame.endswith(name) or f": {name}" in frame:
            return label
    return None


def profile(model: Path, inputs: list[tuple[str, Path]], method: str, rate: int, env: dict[str, str],
            label: str) -> tuple[dict[str, dict[str, float]], dict[str, Any]]:
    out = b.SCRATCH / f"out-{label}"
    raw = b.BENCH_OUT / f"{label}.pyspy.txt"
    b.remove(out)
    b.evict([model, *(p for _, p in inputs)])
    cmd = [str(PY_SPY), "record", "--threads", "--idle", "--nonblocking", "--format", "raw", "-r", str(rate),
           "-o", str(raw), "--", *b.streammerge_command(model, inputs, method, out)]
    run = b.run_measured(label, cmd, b.BENCH_OUT / "logs" / f"{label}.log", env=env)
    summary = b.last_json_object(Path(run.log).read_text(errors="replace"))
    b.remove(out)
    cache: dict[str, list[str]] = {}
    seconds: dict[str, dict[str, float]] = collections.defaultdict(lambda: collections.defaultdict(float))
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        thread = thread_name(frames[0])
        if thread is not None and count.isdigit():
            seconds[thread][categorize(frames[1:], cache, thread == "merge thread")] += int(count) / rate
    info = {"wall_s": run.wall_s, "cpu_s": run.cpu_s, "maxrss_mib": run.maxrss_mib,
            "engine_s": summary.get("seconds"), "load_avg": run.load_avg, "raw": str(raw), "rc": run.rc}
    return {t: dict(c) for t, c in seconds.items()}, info


def elementary_costs() -> list[tuple[str, float]]:
    """Seconds per 64 MiB (fp32) block of the operations the engine repeats, on this machine."""
    code = r'''
import hashlib, json, os, tempfile, time, torch
rows, cols = 8192, 2048  # 64 MiB fp32
x16 = torch.randn(rows, cols).to(torch.bfloat16); x32 = torch.empty(rows, cols); l = torch.randn(rows, 64) / 8
r = torch.randn(64, cols) / 8; data = os.urandom(rows * cols * 2)
def t(fn, reps=6):
    fn(); start = time.perf_counter()
    for _ in range(reps): fn()
    return (time.perf_counter() - start) / reps
out = {
 "bf16→fp32 into a fresh tensor": t(lambda: x16.to(torch.float32)),
 "bf16→fp32 into a reused buffer": t(lambda: x32.copy_(x16)),
 "fp32→bf16 into a fresh tensor": t(lambda: x32.to(torch.bfloat16)),
 "rank-64 addmm_ into the block": t(lambda: x32.addmm_(l, r)),
 "isfinite().all() of the block": t(lambda: torch.isfinite(x32).all()),
 "SHA-256 of the bf16 block (32 MiB)": t(lambda: hashlib.sha256(data).digest()),
}
print(json.dumps(out))
'''
    import json

    text = subprocess.run([str(b.MAIN_PY), "-c", code], capture_output=True, text=True, check=True).stdout
    return list(json.loads(text).items())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="1b")
    parser.add_argument("--method", default="task_arithmetic")
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--rate", type=int, default=50, help="samples per second")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="environment of the merge, e.g. OMP_NUM_THREADS=1 (repeatable)")
    b.add_source_argument(parser)
    args = parser.parse_args()
    if not PY_SPY.is_file():
        raise SystemExit(f"py-spy is not installed in the main venv: {b.MAIN_PY.parent / 'pip'} install py-spy")
    b.use_source(args.source)
    machine = b.machine()
    env = dict(item.split("=", 1) for item in args.env)
    model = model_for(args.preset)
    inputs = [("adapter", p) for p in b.ensure_adapters(model, args.adapters)]
    tag = hashlib.sha256(" ".join(args.env).encode()).hexdigest()[:6] if env else "default"
    label = f"profile-{args.preset}-{args.method}-{tag}"
    seconds, info = profile(model, inputs, args.method, args.rate, env, label)
    floor = b.measure_floor(model)
    categories = sorted({c for t in seconds.values() for c in t},
                        key=lambda c: -sum(t.get(c, 0.0) for t in seconds.values()))
    wall = info["wall_s"]
    rows = [[c, *(b.fmt_s(seconds.get(t, {}).get(c)) if seconds.get(t, {}).get(c) else "—"
                  for t in THREADS.values()),
             f"{100 * seconds.get('merge thread', {}).get(c, 0.0) / wall:.0f} %"] for c in categories]
    text = (f"wall {b.fmt_s(wall)} (engine {b.fmt_s(info['engine_s'])}), CPU {b.fmt_s(info['cpu_s'])}, "
            f"floor {b.fmt_s(floor['seconds'])}, load {info['load_avg'][0]}, env {env or 'default'}\n\n"
            + b.markdown_table(["category", "merge thread", "writer thread", "share of wall (merge thread)"], rows))
    costs = elementary_costs()
    text += "\n\n" + b.markdown_table(["elementary operation (64 MiB fp32 block)", "time"],
                                      [[name, f"{1000 * s:.1f} ms"] for name, s in costs])
    doc = {"benchmark": "profile", "command": b.invocation(), "machine": machine, "preset": args.preset,
           "method": args.method, "env": env, "run": info, "floor": floor, "seconds": seconds,
           "elementary_costs_s": dict(costs), "table": text}
    path = b.save_results(label, doc)
    print(f"{b.machine_line(machine)}\n`{doc['command']}`\n\n{text}\n\nJSON: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
