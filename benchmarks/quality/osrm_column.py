"""The OSRM column of the merge-quality benchmark: adapters retrained from the OSRM
initialisation (``streammerge osrm-init``, arXiv 2505.22934), merged with Task Arithmetic and
DO-Merging, evaluated exactly like the standard adapters.

Everything except the initialisation is the standard pipeline, reused rather than copied:

1. unlabelled data: the first ``--examples`` training texts of every task (labels dropped)
   → ``<cache>/osrm/data/<task>.jsonl``;
2. ``python -m streammerge osrm-init --backbone …`` with train.py's rank, alpha and target
   modules → ``<cache>/osrm/init/<task>/`` (A = the OSRM subspace of the *other* tasks, B = 0);
3. ``train.py`` unchanged (same steps, learning rates, batch order, seeds, LP-FT head from
   the probe) except that ``get_peft_model`` is replaced, for the duration of the call, by
   ``PeftModel.from_pretrained(backbone, <init>/<task>, is_trainable=True)``
   → ``<cache>/osrm/{adapters,heads,train_results.json}``;
4. ``run_merges.py`` on the cache view ``<cache>/osrm`` (its model, tasks and base features
   are links to the main cache's) → ``<cache>/osrm/merge_results.json``;
5. a side-by-side table, standard vs OSRM-initialised, from both caches' results (the
   standard column needs ``train.py`` and ``run_merges.py --configs ta,do`` run first).

Steps whose outputs exist are skipped, so the script can be interrupted and re-run.

    .venv/bin/python benchmarks/quality/osrm_column.py                      # all tasks, train.py defaults
    .venv/bin/python benchmarks/quality/osrm_column.py --lambdas default,0.5,0.75 --select
    .venv/bin/python benchmarks/quality/osrm_column.py --report
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run_merges  # noqa: E402
import train  # noqa: E402
from common import (DEFAULT_CACHE, LORA_TARGETS, MODEL_SUBDIR, REPO, TASKS_SUBDIR, load_task,  # noqa: E402
                    read_jsonl, set_threads, task_names, write_jsonl)

VIEW = "osrm"
SHARED = (MODEL_SUBDIR, TASKS_SUBDIR, "base_features")


def make_view(cache: Path) -> Path:
    """``<cache>/osrm``: a cache of its own whose model, tasks and base features link to the main one."""
    view = cache / VIEW
    view.mkdir(parents=True, exist_ok=True)
    for name in SHARED:
        (cache / name).mkdir(parents=True, exist_ok=True)
        link = view / name
        if not link.exists():
            link.symlink_to(Path("..") / name, target_is_directory=True)
    return view


def write_unlabelled(cache: Path, view: Path, tasks: list[str], examples: int) -> dict[str, Path]:
    files = {}
    for task in tasks:
        path = view / "data" / f"{task}.jsonl"
        if not path.exists():
            rows = read_jsonl(cache / TASKS_SUBDIR / task / "train.jsonl")[:examples]
            write_jsonl(path, ({"text": r["text"]} for r in rows))
        files[task] = path
    return files


def osrm_init(view: Path, files: dict[str, Path], args: argparse.Namespace) -> Path:
    out = view / "init"
    if all((out / t / "adapter_model.safetensors").exists() for t in files) and (out / "osrm_report.json").exists():
        return out
    cmd = [sys.executable, "-m", "streammerge", "osrm-init", "--backbone", "--base", str(view / MODEL_SUBDIR),
           "--target-modules", *LORA_TARGETS, "--rank", str(args.rank), "--alpha", str(args.alpha),
           "--variant", args.variant, "--max-examples", str(args.examples), "--max-length", str(train.MAX_LEN),
           "--device", "cpu", "--dtype", "float32", "--out", str(out)]
    for task, path in files.items():
        cmd += ["--task", f"{task}={path}"]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               PYTHONWARNINGS="ignore")
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    log = view / "logs" / "osrm_init.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(" ".join(cmd) + "\n\n" + proc.stderr + "\n" + proc.stdout)
    if proc.returncode != 0:
        raise SystemExit(f"osrm-init failed (exit {proc.returncode}), see {log}:\n{proc.stderr[-3000:]}")
    print(f"osrm-init: {time.time() - t0:.0f} s ({log})", flush=True)
    return out


@contextlib.contextmanager
def peft_starts_from(init_dir: Path) -> Iterator[None]:
    """Make train.py's ``get_peft_model(backbone, config)`` load our initialisation instead."""
    import peft

    expected = json.loads((init_dir / "adapter_config.json").read_text())
    original = peft.get_peft_model

    def from_init(model: Any, config: Any, *args: Any, **kwargs: Any) -> Any:
        # The init must be the adapter train.py would have built: same rank, alpha and targets.
        same = (config.r == expected["r"] and float(config.lora_alpha) == float(expected["lora_alpha"])
                and set(config.target_modules) == set(expected["target_modules"]))
        if not same:
            raise SystemExit(f"{init_dir} has r={expected['r']} alpha={expected['lora_alpha']} targets="
                             f"{expected['target_modules']}, train.py asks for r={config.r} "
                             f"alpha={config.lora_alpha} targets={sorted(config.target_modules)}")
        return peft.PeftModel.from_pretrained(model, init_dir, is_trainable=True)

    peft.get_peft_model = from_init
    try:
        yield
    finally:
        peft.get_peft_model = original


def train_from_init(view: Path, init: Path, all_tasks: list[str], tasks: list[str], args: argparse.Namespace) -> None:
    for task in tasks:
        # train.py seeds task number i with seed + i (probe) and seed + 1000 + i (LoRA): keep the
        # standard run's numbering when training one task at a time.
        i = all_tasks.index(task)
        with peft_starts_from(init / task):
            train.main(["--cache", str(view), "--tasks", task, "--seed", str(args.seed + i),
                        "--steps", str(args.steps), "--batch", str(args.batch), "--lr", str(args.lr),
                        "--head-lr", str(args.head_lr), "--rank", str(args.rank), "--alpha", str(args.alpha),
                        "--threads", str(args.threads)])


def _avg(d: dict[str, float], tasks: list[str]) -> float:
    return sum(d[t] for t in tasks) / len(tasks)


def side_by_side(cache: Path, view: Path, configs: list[str]) -> None:
    """Standard vs OSRM-initialised adapters: individual and merged test accuracy (%)."""
    def load(root: Path, name: str) -> dict[str, Any]:
        path = root / name
        return json.loads(path.read_text()) if path.exists() else {}

    std_train, osrm_train = load(cache, train.RESULTS), load(view, train.RESULTS)
    std_merge, osrm_merge = load(cache, run_merges.MERGE_RESULTS), load(view, run_merges.MERGE_RESULTS)
    tasks = sorted(osrm_train)
    if not tasks:
        print("no OSRM-initialised adapters trained yet")
        return
    report = load(view / "init", "osrm_report.json")
    print("\n### Standard vs OSRM-initialised LoRA (test accuracy %, avg over " + ", ".join(tasks) + ")\n")
    print("| adapters | individual | " + " | ".join(run_merges.LABELS.get(c, c) + " λ=default" for c in configs)
          + " |\n|---|---|" + "---|" * len(configs))
    for label, tr, mr in (("standard (PEFT init)", std_train, std_merge), ("OSRM init", osrm_train, osrm_merge)):
        ind = f"{100 * _avg({t: tr[t]['individual']['test'] for t in tasks}, tasks):.1f}" \
            if all(t in tr for t in tasks) else "–"
        cells = []
        for c in configs:
            d = mr.get(f"{c}|{run_merges.DEFAULT}", {}).get("test")
            cells.append(f"{100 * _avg(d, tasks):.1f}" if d and all(t in d for t in tasks) else "–")
        print(f"| {label} | {ind} | " + " | ".join(cells) + " |")
    if report:
        print("\nOSRM subspace diagnostics (osrm-init report; a random A passes r/d of the energy):")
        for task, a in report.get("adapters", {}).items():
            print(f"  {task}: other tasks' feature energy passed {a['others_energy_mean']:.2e}, "
                  f"own {a.get('own_energy_mean', float('nan')):.2e}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--tasks", help="comma-separated subset to train (the OSRM subspaces still use every task)")
    ap.add_argument("--examples", type=int, default=256, help="unlabelled examples per task for OSRM (default 256)")
    ap.add_argument("--variant", default="covariance", choices=["covariance", "means"])
    ap.add_argument("--configs", default="ta,do", help="merge configurations (run_merges.py names)")
    ap.add_argument("--lambdas", default=run_merges.DEFAULT)
    ap.add_argument("--select", action="store_true", help="as run_merges.py --select")
    ap.add_argument("--report", action="store_true", help="only print the tables")
    # train.py's hyperparameters, passed through unchanged (defaults equal to train.py's)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--head-lr", type=float, default=1e-3)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    set_threads(args.threads)
    cache = args.cache
    view = make_view(cache)
    configs = [c for c in args.configs.split(",") if c]
    if not args.report:
        all_tasks = task_names(cache)
        tasks = args.tasks.split(",") if args.tasks else all_tasks
        for task in tasks:
            load_task(cache, task)  # fail early on an unknown task
        init = osrm_init(view, write_unlabelled(cache, view, all_tasks, args.examples), args)
        train_from_init(view, init, all_tasks, tasks, args)
        merge_args = ["--cache", str(view), "--configs", ",".join(configs), "--lambdas", args.lambdas,
                      "--splits", "validation,test", "--threads", str(args.threads)]
        run_merges.main(merge_args + (["--select"] if args.select else []))
    side_by_side(cache, view, configs)


if __name__ == "__main__":
    main()
