"""Merge the task adapters through the real product CLI and evaluate every task on the merged
backbone with its own head; print paper-style markdown tables.

Every merge is ``python -m streammerge merge --base MODEL --adapter A1 ... --method M
--param k=v ... --out DIR`` in a child process (one BLAS thread); the merged directory is
loaded with transformers, the pooled features of all evaluation texts are computed once (the
tasks share many synopses) and every task's head scores its own split. Results accumulate in
``<cache>/merge_results.json`` keyed by (configuration, λ); a key already there is not redone,
so the script can be interrupted and re-run, and ``--report`` alone only prints the tables.

λ is chosen on the validation split only: ``--lambdas`` lists the values to try there;
``--select`` then merges each configuration again at its best validation λ and evaluates it on
test. Test numbers are also reported at each method's default λ.

    .venv/bin/python benchmarks/quality/run_merges.py --configs ta,do --lambdas default --splits validation,test
    .venv/bin/python benchmarks/quality/run_merges.py --configs ta,do --lambdas 0.5,0.75,1.25 --splits validation --select
    .venv/bin/python benchmarks/quality/run_merges.py --report
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (ADAPTERS_SUBDIR, DEFAULT_CACHE, HEADS_SUBDIR, REPO, accuracy, features,  # noqa: E402
                    model_dir, load_backbone, load_head, load_task, load_tokenizer, set_threads, write_json)
from train import MAX_LEN, RESULTS  # noqa: E402

MERGE_RESULTS = "merge_results.json"
DEFAULT = "default"

# name -> (method, fixed params, name of its scale parameter, its default value)
CONFIGS: dict[str, tuple[str, dict[str, str], str, float]] = {
    "base": ("task_arithmetic", {"lambda": "0"}, "lambda", 0.0),
    "ta": ("task_arithmetic", {}, "lambda", 1.0),
    "do": ("do_merging", {}, "lambda", 1.0),
    # ALGORITHMS.md's orthogonalization: DO-Merging's defaults until 2026-12-03 (the "do" rows of earlier runs)
    "do_spec": ("do_merging", {"cross_loss": "squared", "lr": "1e-3", "mu": "1", "max_delta": "0.2",
                               "on_max_delta": "warn_skip"}, "lambda", 1.0),
    "do_ortho_only": ("do_merging", {"decouple": "false"}, "lambda", 1.0),
    "do_decouple_only": ("do_merging", {"orthogonalize": "false"}, "lambda", 1.0),
    "do_col": ("do_merging", {"norm_axis": "col"}, "lambda", 1.0),
    "do_matrix": ("do_merging", {"norm_axis": "matrix"}, "lambda", 1.0),
    "do_mean": ("do_merging", {"direction_reduce": "mean"}, "lambda", 1.0),
    "linear": ("linear", {}, "", 1.0),
    "ties": ("ties", {}, "lambda", 1.0),
    "ties_do": ("ties", {"orthogonalize": "true", "decouple": "true"}, "lambda", 1.0),
    "dare_ties": ("dare_ties", {}, "lambda", 1.0),
    "breadcrumbs": ("breadcrumbs", {}, "lambda", 1.0),
    "knots": ("knots", {}, "lambda", 0.5),
    "tsv": ("tsv", {}, "alpha", 1.0),
    "iso_c": ("iso_c", {}, "alpha", 1.0),
    "iso_cts": ("iso_cts", {}, "alpha", 1.0),
    # the data-free scale rule (methods/autoscale.py): only a "default" key, never on a λ grid
    "ta_auto": ("task_arithmetic", {"lambda": "auto"}, "lambda", 1.0),
    "ties_auto": ("ties", {"lambda": "auto"}, "lambda", 1.0),
    "tsv_auto": ("tsv", {"alpha": "auto"}, "alpha", 1.0),
    "iso_c_auto": ("iso_c", {"alpha": "auto"}, "alpha", 1.0),
    "iso_cts_auto": ("iso_cts", {"alpha": "auto"}, "alpha", 1.0),
}
LABELS = {
    "base": "No merge (base backbone, each task's trained head)",
    "ta": "Task Arithmetic", "do": "DO-Merging", "do_spec": "DO-Merging, spec settings", "do_ortho_only": "orthogonalize only",
    "do_decouple_only": "decouple only", "do_col": "DO-Merging, norm_axis=col",
    "do_matrix": "DO-Merging, norm_axis=matrix", "do_mean": "DO-Merging, direction_reduce=mean",
    "linear": "Linear (average)", "ties": "TIES", "ties_do": "TIES + DO components", "dare_ties": "DARE-TIES",
    "breadcrumbs": "Breadcrumbs", "knots": "KnOTS-TIES", "tsv": "TSV-M", "iso_c": "Iso-C", "iso_cts": "Iso-CTS",
    "ta_auto": "Task Arithmetic, λ auto", "ties_auto": "TIES, λ auto", "tsv_auto": "TSV-M, α auto",
    "iso_c_auto": "Iso-C, α auto", "iso_cts_auto": "Iso-CTS, α auto",
}


def is_auto(config: str) -> bool:
    return "auto" in CONFIGS[config][1].values()


def lam_label(config: str, entry: dict) -> str:
    """The λ column: the value, or for the auto rule the mean of its per-tensor choices."""
    if not is_auto(config):
        return f"{lam_value(config, DEFAULT):g}"
    chosen = entry.get("method_stats", {}).get("lambda_auto", {})
    return f"auto (mean {chosen['mean']:.2f})" if "mean" in chosen else "auto"


def extra_param(text: str) -> tuple[str, str, dict[str, str]]:
    """``name=method:k=v,k=v`` on the command line: an ad-hoc configuration (for investigations)."""
    name, _, rest = text.partition("=")
    method, _, kvs = rest.partition(":")
    params = dict(kv.split("=", 1) for kv in kvs.split(",") if kv)
    return name, method, params


def lam_key(lam: str | float) -> str:
    return DEFAULT if lam == DEFAULT else f"{float(lam):g}"


def merge_command(cache: Path, tasks: list[str], config: str, lam: str, out: Path) -> list[str]:
    method, params, scale_name, _ = CONFIGS[config]
    cmd = [sys.executable, "-m", "streammerge", "merge", "--base", str(model_dir(cache))]
    for task in tasks:
        cmd += ["--adapter", str(cache / ADAPTERS_SUBDIR / task)]
    cmd += ["--method", method]
    all_params = dict(params)
    if lam != DEFAULT:
        all_params[scale_name] = lam
    for k, v in all_params.items():
        cmd += ["--param", f"{k}={v}"]
    return cmd + ["--device", "cpu", "--no-progress", "--out", str(out)]


def run_merge(cmd: list[str], log: Path) -> tuple[dict[str, Any], float]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.time() - t0
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(" ".join(cmd) + "\n\n" + proc.stderr + "\n" + proc.stdout)
    if proc.returncode != 0:
        raise SystemExit(f"merge failed (exit {proc.returncode}), see {log}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout), seconds


def evaluate(model_dir: Path, cache: Path, tasks: list[str], splits: list[str], tok: Any,
             data: dict[str, dict], heads: dict[str, torch.nn.Module]) -> dict[str, dict[str, Any]]:
    """Accuracy per split per task, plus ``correct``: per split and task a string of 0/1 per
    example (for paired comparisons); features of each distinct text computed once."""
    backbone = load_backbone(model_dir)
    texts = sorted({r["text"] for t in tasks for s in splits for r in data[t][s]})
    feats = features(backbone, tok, texts, MAX_LEN)
    row = {t: i for i, t in enumerate(texts)}
    out: dict[str, dict[str, Any]] = {"correct": {}}
    for split in splits:
        out[split], out["correct"][split] = {}, {}
        for t in tasks:
            idx = torch.tensor([row[r["text"]] for r in data[t][split]])
            labels = [r["label"] for r in data[t][split]]
            out[split][t] = accuracy(heads[t], feats[idx], labels)
            with torch.no_grad():
                hit = heads[t](feats[idx]).argmax(-1) == torch.tensor(labels)
            out["correct"][split][t] = "".join("1" if h else "0" for h in hit.tolist())
    return out


def sync_with_file(results: dict[str, Any], key: str, path: Path) -> None:
    """Before writing ``key``: another run_merges process may have added keys, or splits of keys,
    since we read the file. The file is the truth for every other key; its splits of ``key`` are kept."""
    if not path.exists():
        return
    disk = json.loads(path.read_text())
    mine = results.get(key, {})
    results.clear()
    results.update(disk)
    if mine:
        theirs = disk.get(key, {})
        results[key] = {**mine, **theirs, "correct": {**mine.get("correct", {}), **theirs.get("correct", {})}}


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def best_lambda(results: dict, config: str) -> str | None:
    """The λ with the highest validation average among those evaluated (ties: the smaller λ)."""
    base = config.split("@")[0]
    cands = [(mean(list(v["validation"].values())), -lam_value(base, k.split("|")[1]), k.split("|")[1])
             for k, v in results.items() if k.split("|")[0] == config and "validation" in v]
    if not cands:
        return None
    _, _, lam = max(cands)
    return lam


def lam_value(config: str, lam: str) -> float:
    return CONFIGS[config][3] if lam == DEFAULT else float(lam)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--configs", default="", help=f"comma-separated, from: {','.join(CONFIGS)}")
    ap.add_argument("--config", action="append", default=[], type=extra_param, metavar="NAME=METHOD:K=V,...",
                    help="an extra configuration, e.g. do_mu0.1=do_merging:mu=0.1 (repeatable)")
    ap.add_argument("--lambdas", default=DEFAULT, help="comma-separated λ values and/or 'default'")
    ap.add_argument("--splits", default="validation,test")
    ap.add_argument("--select", action="store_true",
                    help="also merge each config at its best validation λ and evaluate on test")
    ap.add_argument("--keep", action="store_true", help="keep the merged model directories")
    ap.add_argument("--force", action="store_true", help="merge and evaluate again even if results exist")
    ap.add_argument("--report", action="store_true", help="print the tables of all results so far")
    ap.add_argument("--tasks", help="merge only these tasks' adapters (default: all trained); "
                    "a subset gets its own result keys")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    set_threads(args.threads)
    for name, method, params in args.config:
        CONFIGS[name] = (method, params, "alpha" if method in ("tsv", "iso_c", "iso_cts") else "lambda",
                         0.5 if method == "knots" else 1.0)
        LABELS[name] = name
    train_results = json.loads((args.cache / RESULTS).read_text())
    tasks = sorted(args.tasks.split(",")) if args.tasks else sorted(train_results)
    subset = "" if tasks == sorted(train_results) else "@" + "+".join(tasks)
    results_path = args.cache / MERGE_RESULTS
    results: dict[str, Any] = json.loads(results_path.read_text()) if results_path.exists() else {}
    know_adhoc_configs(results)
    configs = [c for c in args.configs.split(",") if c] + [n for n, _, _ in args.config]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown configs {unknown}; choose from {list(CONFIGS)}")

    jobs: list[tuple[str, str, list[str]]] = []
    for config in configs:
        for lam in args.lambdas.split(","):
            jobs.append((config, lam_key(lam.strip()), args.splits.split(",")))
    if jobs or args.select:
        tok = load_tokenizer(model_dir(args.cache))
        data = {t: load_task(args.cache, t) for t in tasks}
        heads = {t: load_head(args.cache / HEADS_SUBDIR / f"{t}.safetensors") for t in tasks}

    def do_job(config: str, lam: str, splits: list[str]) -> None:
        key = f"{config}{subset}|{lam}"
        have = results.get(key, {})
        todo = [s for s in splits if s not in have or args.force]
        if not todo:
            return
        out = args.cache / "merged" / key.replace("|", "_")
        shutil.rmtree(out, ignore_errors=True)
        cmd = merge_command(args.cache, tasks, config, lam, out)
        summary, merge_s = run_merge(cmd, args.cache / "logs" / f"merge_{key.replace('|', '_')}.log")
        t0 = time.time()
        acc = evaluate(out, args.cache, tasks, todo, tok, data, heads)
        eval_s = time.time() - t0
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
        sync_with_file(results, key, results_path)
        entry = results.setdefault(key, {})
        correct = acc.pop("correct")
        entry.update(acc)
        for split, per_task in correct.items():
            entry.setdefault("correct", {})[split] = per_task
        entry.setdefault("seconds", {}).update({"merge_wall": round(merge_s, 1), "merge_engine": summary["seconds"],
                                                f"eval_{'+'.join(todo)}": round(eval_s, 1)})
        entry["config"] = list(CONFIGS[config])
        entry["command"] = " ".join(["python", "-m", "streammerge", *cmd[3:]]).replace(str(args.cache), "$CACHE")
        entry["method_stats"] = summary.get("method_stats", {})
        write_json(results_path, results)
        line = " ".join(f"{s} avg {mean(list(acc[s].values())):.4f}" for s in todo)
        print(f"{key:28s} {line} | merge {merge_s:.0f} s, eval {eval_s:.0f} s", flush=True)

    for job in jobs:
        do_job(*job)
    if args.select:
        for config in configs:
            lam = best_lambda(results, config + subset)
            if lam is not None:
                do_job(config, lam, ["validation", "test"])
    know_adhoc_configs(results)  # a parallel run may have added its own ad-hoc keys since
    print_report({k: v for k, v in results.items() if "@" not in k}, train_results, sorted(train_results))


def know_adhoc_configs(results: dict[str, Any]) -> None:
    """Register the ad-hoc (``--config``) configurations that results of other runs name."""
    for key, entry in results.items():
        name = key.split("|")[0].split("@")[0]
        if name not in CONFIGS and "config" in entry:
            method, params, scale_name, default = entry["config"]
            CONFIGS[name] = (method, dict(params), scale_name, default)
            LABELS[name] = name


# ---------------------------------------------------------------- tables

def fmt(x: float) -> str:
    return f"{100 * x:.1f}"


def paired_bootstrap(a: dict[str, str], b: dict[str, str], tasks: list[str], n: int = 4000,
                     seed: int = 0, scale: dict[str, float] | None = None) -> tuple[float, float, float]:
    """Mean over tasks of (acc_a − acc_b)·scale_t and a 95% CI, resampling each task's examples
    (paired); ``scale`` 1/individual accuracy gives the normalized-accuracy difference."""
    gen = torch.Generator().manual_seed(seed)
    diffs = torch.zeros(n, dtype=torch.float64)
    point = 0.0
    for t in tasks:
        w = 1.0 if scale is None else scale[t]
        d = torch.tensor([int(x) - int(y) for x, y in zip(a[t], b[t])], dtype=torch.float64) * w
        point += float(d.mean()) / len(tasks)
        idx = torch.randint(len(d), (n, len(d)), generator=gen)
        diffs += d[idx].mean(1) / len(tasks)
    lo, hi = torch.quantile(diffs, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return point, lo, hi


def print_report(results: dict, train_results: dict, tasks: list[str]) -> None:
    ind = {t: train_results[t]["individual"]["test"] for t in tasks}
    probe = {t: train_results[t]["head_only"]["test"] for t in tasks}
    head = "| method | λ | " + " | ".join(tasks) + " | avg | norm. acc |"
    sep = "|---|---|" + "---|" * len(tasks) + "---|---|"

    def row(label: str, lam: str, acc: dict[str, float]) -> str:
        norm = mean([acc[t] / ind[t] for t in tasks])
        return f"| {label} | {lam} | " + " | ".join(fmt(acc[t]) for t in tasks) + \
            f" | **{fmt(mean(list(acc.values())))}** | {fmt(norm)} |"

    print("\n### Test accuracy (%) per task; λ = method default, or best on validation (val)\n")
    print(head + "\n" + sep)
    print(row("Base + head only (lower bound)", "–", probe))
    print(row("Individual LoRA (upper bound)", "–", ind))
    seen = [c for c in CONFIGS if any(k.split("|")[0] == c for k in results)]
    for config in seen:
        d = results.get(f"{config}|{DEFAULT}")
        if d and "test" in d:
            print(row(LABELS.get(config, config), lam_label(config, d), d["test"]))
        best = best_lambda(results, config)
        if best is not None and best != DEFAULT and "test" in results[f"{config}|{best}"]:
            print(row(LABELS.get(config, config), f"{best} (val)", results[f"{config}|{best}"]["test"]))

    print("\n### Validation average accuracy (%) per λ (selection split)\n")
    lams = sorted({lam_value(k.split("|")[0], k.split("|")[1]) for k, v in results.items()
                   if "validation" in v and not is_auto(k.split("|")[0])})
    print("| method | " + " | ".join(f"{x:g}" for x in lams) + " |\n|---|" + "---|" * len(lams))
    for config in [c for c in seen if not is_auto(c)]:
        cells = []
        for x in lams:
            v = next((mean(list(d["validation"].values())) for k, d in results.items()
                      if k.split("|")[0] == config and "validation" in d and lam_value(config, k.split("|")[1]) == x),
                     None)
            cells.append("" if v is None else fmt(v))
        print(f"| {LABELS.get(config, config)} | " + " | ".join(cells) + " |")

    autos = [c for c in seen if is_auto(c) and c.removesuffix("_auto") in seen and "validation" in results.get(f"{c}|{DEFAULT}", {})]
    if autos:
        print("\n### The auto scale rule vs the validation-best scale (validation average, %)\n")
        print("| method | auto: mean chosen | auto: val avg | best val scale | best: val avg | auto − best |")
        print("|---|---|---|---|---|---|")
        for c in autos:
            plain = c.removesuffix("_auto")
            auto_val = mean(list(results[f"{c}|{DEFAULT}"]["validation"].values()))
            best = best_lambda(results, plain)
            best_val = mean(list(results[f"{plain}|{best}"]["validation"].values()))
            print(f"| {LABELS.get(plain, plain)} | {lam_label(c, results[f'{c}|{DEFAULT}'])} | {fmt(auto_val)} | "
                  f"{lam_value(plain, best):g} | {fmt(best_val)} | {100 * (auto_val - best_val):+.1f} |")

    pairs = [(a, "ta") for a in seen if a not in ("ta", "base")] + [("ta", "base")]
    pairs = [(a, b) for a, b in pairs if a in seen and b in seen]
    lines = []
    for a, b in pairs:
        for which in ("default", "best"):
            la = DEFAULT if which == "default" else best_lambda(results, a)
            lb = DEFAULT if which == "default" else best_lambda(results, b)
            ra, rb = results.get(f"{a}|{la}", {}), results.get(f"{b}|{lb}", {})
            if "test" not in ra.get("correct", {}) or "test" not in rb.get("correct", {}):
                continue
            d, lo, hi = paired_bootstrap(ra["correct"]["test"], rb["correct"]["test"], tasks)
            nd, nlo, nhi = paired_bootstrap(ra["correct"]["test"], rb["correct"]["test"], tasks,
                                            scale={t: 1 / ind[t] for t in tasks})
            lam_txt = "default" if which == "default" else f"{lam_value(a, la):g} vs {lam_value(b, lb):g} (val)"
            lines.append(f"| {LABELS.get(a, a)} − {LABELS.get(b, b)} | {lam_txt} | {100 * d:+.2f} | "
                         f"[{100 * lo:+.2f}, {100 * hi:+.2f}] | {100 * nd:+.2f} | [{100 * nlo:+.2f}, {100 * nhi:+.2f}] |")
    if lines:
        print("\n### Paired differences on test (points; 95% bootstrap CI over examples)\n")
        print("| comparison | λ | Δ avg | 95% CI | Δ norm. acc | 95% CI |\n|---|---|---|---|---|---|\n"
              + "\n".join(dict.fromkeys(lines)))

    ablation = [("ta", "–", "–", "row"), ("do_ortho_only", "✓", "–", "row"), ("do_decouple_only", "–", "✓", "row"),
                ("do", "✓", "✓", "row"), ("do_col", "✓", "✓", "col"), ("do_matrix", "✓", "✓", "matrix")]
    if any(f"{c}|{DEFAULT}" in results for c, *_ in ablation):
        print("\n### Ablation (test avg / normalized accuracy, %)\n")
        print("| orthogonalize | decouple | norm axis | avg @ λ=1 | norm. @ λ=1 | best val λ | avg @ best | norm. @ best |")
        print("|---|---|---|---|---|---|---|---|")
        for config, o, dcp, axis in ablation:
            d = results.get(f"{config}|{DEFAULT}")
            if not d or "test" not in d:
                continue
            best = best_lambda(results, config)
            b = results.get(f"{config}|{best}", {}) if best else {}
            cells = [fmt(mean(list(d["test"].values()))), fmt(mean([d["test"][t] / ind[t] for t in tasks]))]
            if "test" in b and best != DEFAULT:
                cells += [best, fmt(mean(list(b["test"].values()))), fmt(mean([b["test"][t] / ind[t] for t in tasks]))]
            else:
                cells += ["–", "", ""]
            print(f"| {o} | {dcp} | {axis} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
