"""The same mergekit YAML run by mergekit 0.1.5 and by streammerge: tensors, wall time, peak RSS.

For each method both tools share, on a synthetic fp32 Llama (full fine-tunes, and ``model+lora``
inputs), one config with a per-layer gradient weight and a ``filter`` weight is run by
``mergekit-yaml`` (benchmarks/.venv-peers) and by ``streammerge merge``, and every output tensor
is compared: bit-identical or not, max |diff|, max diff in fp32 ulps, and the L1 norm of the
merged update (ours / mergekit's) with the share of entries it changes.

DARE draws its masks from torch's global generator in mergekit and from per-tensor seeded
generators in streammerge (order-independent, so resume and row blocks see the same mask):
those rows compare the statistics, not the bits.  mergekit turns each ``model+lora`` into a full
merged copy first (PEFT ``merge_and_unload``, in ``--lora-merge-cache``; a fresh cache per run
here, as a first run pays it), so its task vector is ``fl(W + s·B·A) − W``, not ``s·B·A``.

    STREAMMERGE_BENCH_PYTHON=/path/to/.venv/bin/python python benchmarks/bench_mergekit.py --preset small
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib as bl  # noqa: E402

METHODS = ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties")
RANDOM = {"dare_linear", "dare_ties"}
ROOT = bl.DATA / "mergekit"


DTYPES = {"float32": "F32", "bfloat16": "BF16"}


def prepare(preset: str, dtype: str) -> dict[str, Path]:
    """A base in ``dtype``, two full fine-tunes and two rank-16 LoRAs (generated once)."""
    root = ROOT / (preset if dtype == "float32" else f"{preset}-{dtype}")
    paths = {name: root / name for name in ("base", "ft1", "ft2", "l1", "l2")}
    if not (root / ".complete").is_file():
        shutil.rmtree(root, ignore_errors=True)
        bl.synthetic("model", "--preset", preset, "--dtype", DTYPES[dtype], "--out", str(paths["base"]))
        for seed in (1, 2):
            bl.synthetic("finetune", "--model", str(paths["base"]), "--out", str(paths[f"ft{seed}"]),
                         "--seed", str(seed))
            bl.synthetic("adapter", "--model", str(paths["base"]), "--out", str(paths[f"l{seed}"]), "--rank", "16",
                         "--seed", str(seed), "--targets", bl.ADAPTER_TARGETS)
        (root / ".complete").touch()
    return paths


def config(method: str, paths: dict[str, Path], inputs: str, dtype: str = "float32",
           per_model: bool = False) -> dict[str, Any]:
    """One mergekit config: model 1 has a per-layer gradient weight, model 2 a filtered weight.

    ``per_model``: each model its own density / gamma (model 1 a gradient, model 2 a filter list),
    ``linear`` with those gradient / filter weights too, ``task_arithmetic`` with ``normalize: true``."""
    first, second = ((str(paths["ft1"]), str(paths["ft2"])) if inputs == "full" else
                     (f"{paths['base']}+{paths['l1']}", f"{paths['base']}+{paths['l2']}"))
    p1: dict[str, Any] = {"weight": [0.3, 0.9]}
    p2: dict[str, Any] = {"weight": [{"filter": "mlp", "value": 0.5}, {"value": 0.3}]}
    if method not in ("linear", "task_arithmetic"):
        p1["density"] = p2["density"] = 0.5
    if method.startswith("breadcrumbs"):
        p1["gamma"] = p2["gamma"] = 0.05
    if per_model and "density" in p1:
        p1["density"], p2["density"] = [0.3, 0.7], [{"filter": "mlp", "value": 0.6}, {"value": 0.4}]
    if per_model and "gamma" in p1:
        p1["gamma"], p2["gamma"] = 0.05, [0.02, 0.08]
    doc: dict[str, Any] = {"merge_method": method, "dtype": dtype,
                           "models": [{"model": first, "parameters": p1}, {"model": second, "parameters": p2}]}
    if per_model and method == "task_arithmetic":
        doc["parameters"] = {"normalize": True}
    if method == "linear" and per_model:
        if inputs == "full":
            doc["models"].insert(0, {"model": str(paths["base"]), "parameters": {"weight": 0.5}})
    elif method == "linear":
        doc["models"] = [{"model": first, "parameters": {"weight": 0.6}},
                         {"model": second, "parameters": {"weight": 0.4}}]
        if inputs == "full":
            doc["models"].insert(0, {"model": str(paths["base"]), "parameters": {"weight": 0.5}})
    else:
        doc["base_model"] = str(paths["base"])
    return doc


def tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for name in f.keys():
                out[name] = f.get_tensor(name)
    return out


def compare(ours: Path, theirs: Path, base: Path) -> dict[str, Any]:
    a, b, w0 = tensors(ours), tensors(theirs), tensors(base)
    names = sorted(set(a) & set(b))
    identical, max_abs, max_ulp, l1_ours, l1_theirs = 0, 0.0, 0.0, 0.0, 0.0
    changed_ours, changed_theirs, total, differing, differ, beyond = 0, 0, 0, 0, [], 0
    for name in names:
        x, y = a[name].float(), b[name].float()
        identical += int(torch.equal(a[name], b[name]))
        if not torch.equal(a[name], b[name]):
            differ.append(name)
        differing += int((x != y).sum())
        diff = (x - y).abs()
        max_abs = max(max_abs, float(diff.max()))
        base = w0[name].float() if name in w0 else torch.zeros_like(x)
        # ulps of the operands (W0 + Δ rounds at |W0|, as mergekit's fl(W + s·B·A) − W does)
        magnitude = torch.maximum(torch.maximum(x.abs(), y.abs()), base.abs())
        stored = magnitude.to(a[name].dtype)  # ulps of the output dtype
        ulp = (torch.nextafter(stored, torch.full_like(stored, float("inf"))) - stored).float()
        ulps = diff / ulp
        max_ulp = max(max_ulp, float(ulps.max()))
        beyond += int((ulps > 1).sum())
        l1_ours += float((x - base).abs().sum())
        l1_theirs += float((y - base).abs().sum())
        changed_ours += int((x != base).sum())
        changed_theirs += int((y != base).sum())
        total += x.numel()
    return {"tensors": len(names), "only_ours": sorted(set(a) - set(b)), "only_mergekit": sorted(set(b) - set(a)),
            "identical": identical, "differing_entries": differing, "entries": total, "differing_tensors": differ,
            "max_abs_diff": max_abs, "max_ulp": max_ulp, "beyond_one_ulp": beyond,
            "l1_ratio": l1_ours / l1_theirs if l1_theirs else float("nan"),
            "changed_ours": changed_ours / total, "changed_mergekit": changed_theirs / total}


def run_pair(method: str, inputs: str, paths: dict[str, Path], work: Path, dtype: str,
             per_model: bool = False) -> dict[str, Any]:
    case = work / f"{method}-{inputs}"
    shutil.rmtree(case, ignore_errors=True)
    case.mkdir(parents=True)
    cfg = case / "config.yml"
    cfg.write_text(yaml.safe_dump(config(method, paths, inputs, dtype, per_model), sort_keys=False))
    mk = bl.run_measured(f"mergekit {method} {inputs}", [
        str(bl.PEERS_BIN / "mergekit-yaml"), str(cfg), str(case / "mergekit"), "--lora-merge-cache",
        str(case / "lora-cache"), "--lora-merge-dtype", dtype, "--random-seed", "0", "--quiet",
        "--no-write-model-card"], case / "mergekit.log")
    sm = bl.run_measured(f"streammerge {method} {inputs}", [
        str(bl.MAIN_PY), "-m", "streammerge", "merge", str(cfg), "--out", str(case / "streammerge"),
        "--no-progress", "--device", "cpu"], case / "streammerge.log")
    row: dict[str, Any] = {"method": method, "inputs": inputs, "mergekit": mk.record(), "streammerge": sm.record()}
    if mk.rc == 0 and sm.rc == 0:
        row["compare"] = compare(case / "streammerge", case / "mergekit", paths["base"])
        row["lora_cache_bytes"] = bl.tree_bytes((case / "lora-cache").rglob("*.safetensors"))
    return row


def table(rows: list[dict[str, Any]]) -> str:
    header = ["method", "inputs", "identical tensors", "differing entries", "> 1 ulp", "max abs diff",
              "max diff (ulps of max(|W0|, |out|))", "‖Δ‖₁ ours/mk", "changed ours / mk", "mergekit s",
              "streammerge s", "mergekit peak RSS", "streammerge peak RSS"]
    body = []
    for r in rows:
        c = r.get("compare")
        mk, sm = r["mergekit"], r["streammerge"]
        if c is None:
            body.append([r["method"], r["inputs"], f"failed (rc {mk['rc']} / {sm['rc']})"] + [""] * 10)
            continue
        body.append([r["method"], r["inputs"], f"{c['identical']}/{c['tensors']}",
                     f"{c['differing_entries']:,} of {c['entries']:,}", f"{c['beyond_one_ulp']:,}",
                     f"{c['max_abs_diff']:.3g}",
                     f"{c['max_ulp']:.3g}", f"{c['l1_ratio']:.4f}",
                     f"{100 * c['changed_ours']:.1f}% / {100 * c['changed_mergekit']:.1f}%",
                     bl.fmt_s(mk["wall_s"]), bl.fmt_s(sm["wall_s"]), bl.fmt_mib(mk["maxrss_mib"]),
                     bl.fmt_mib(sm["maxrss_mib"])])
    return bl.markdown_table(header, body)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small", help="tools/synthetic.py preset (default: small)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--inputs", default="full,lora", help="full, lora or both")
    parser.add_argument("--keep", action="store_true", help="keep the outputs under the data dir")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                        help="models and config dtype (both compute in it: compute_dtype; linear in fp32)")
    parser.add_argument("--per-model", action="store_true",
                        help="a density / gamma per model (gradient and filter), gradient weights for linear, "
                             "normalize: true for task_arithmetic")
    args = parser.parse_args()
    if not (bl.PEERS_BIN / "mergekit-yaml").exists():
        raise SystemExit(f"mergekit is not installed in {bl.PEERS_BIN.parent}: create it with `python -m venv "
                         "benchmarks/.venv-peers`, then pip install torch==2.13.0, then mergekit==0.1.5")
    paths = prepare(args.preset, args.dtype)
    work = paths["base"].parent / "runs"
    rows = []
    for inputs in args.inputs.split(","):
        for method in args.methods.split(","):
            rows.append(run_pair(method, inputs, paths, work, args.dtype, args.per_model))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
            if not args.keep:
                shutil.rmtree(work / f"{method}-{inputs}", ignore_errors=True)
    doc = {"machine": bl.machine(), "peers": bl.peer_versions(), "command": bl.invocation(), "preset": args.preset,
           "dtype": args.dtype, "per_model": args.per_model,
           "rows": rows, "load_avg_end": bl.loadavg()}
    path = bl.save_results("mergekit", doc)
    print(f"\n{bl.machine_line(doc['machine'])}; load average at start {rows[0]['mergekit']['load_avg']}, "
          f"end {doc['load_avg_end']}\n")
    print(table(rows))
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
