"""DO-Merging's orthogonalization, adapter by adapter (the paper's Fig. 3): does each task's
adapter keep its own accuracy after its factors are nudged apart from the other tasks'?

For one orthogonalization setting (the ``do_merging`` parameters ``steps``, ``lr``, ``mu``,
``max_delta``, ``on_max_delta``, ``search_space``, ``sides``) every adapted module's A's and
B's of all tasks go through ``streammerge.methods.orthogonalize.orthogonalize_updates_many``
(the same function DO-Merging runs); each task's perturbed factors are written as a PEFT
adapter and scored *alone* with the task's own head. Also reports the cross-Gram reduction per
module (mean / max over modules of after/before, both sides) and the largest ‖δ‖/‖X‖.
Results go to ``<cache>/ortho_individual.json`` keyed by the setting.

    .venv/bin/python benchmarks/quality/ortho_individual.py --cache DIR --name strong \
        --param steps=2000 --param mu=0.1 [--splits validation,test]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (ADAPTERS_SUBDIR, HEADS_SUBDIR, accuracy, features, load_backbone, load_head,  # noqa: E402
                    load_task, load_tokenizer, model_dir, set_threads, write_json)
from train import MAX_LEN, RESULTS  # noqa: E402

from streammerge.methods import get_method  # noqa: E402
from streammerge.methods.base import LowRankUpdate  # noqa: E402
from streammerge.methods.orthogonalize import OrthoSettings, orthogonalize_updates_many  # noqa: E402

OUT = "ortho_individual.json"


def orthogonalized_adapters(cache: Path, tasks: list[str], settings: OrthoSettings,
                            dest: Path) -> dict[str, float]:
    """Write each task's orthogonalized adapter under ``dest/<task>``; return summary stats."""
    from safetensors.torch import load_file, save_file

    ads = {t: load_file(str(cache / ADAPTERS_SUBDIR / t / "adapter_model.safetensors")) for t in tasks}
    modules = sorted(k.removesuffix(".lora_A.weight") for k in ads[tasks[0]] if k.endswith(".lora_A.weight"))
    updates = [[LowRankUpdate(up=ads[t][f"{m}.lora_B.weight"], down=ads[t][f"{m}.lora_A.weight"]) for t in tasks]
               for m in modules]
    with torch.inference_mode():
        done = orthogonalize_updates_many(updates, settings, modules)
    ratio: dict[str, list[float]] = {"A": [], "B": []}
    delta = {"A": 0.0, "B": 0.0}
    for m, (new, stats) in zip(modules, done):
        for side in ("A", "B"):
            before = stats[f"ortho_cross_gram_{side}_before"]
            if before > 0:
                ratio[side].append(stats[f"ortho_cross_gram_{side}_after"] / before)
            delta[side] = max(delta[side], stats[f"ortho_delta_{side}_max"])
        for t, u in zip(tasks, new):
            ads[t][f"{m}.lora_A.weight"] = u.down.contiguous()
            ads[t][f"{m}.lora_B.weight"] = u.up.contiguous()
    for t in tasks:
        out = dest / t
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(cache / ADAPTERS_SUBDIR / t / "adapter_config.json", out / "adapter_config.json")
        save_file({k: v.contiguous() for k, v in ads[t].items()}, str(out / "adapter_model.safetensors"))
    summary: dict[str, float] = {}
    for side in ("A", "B"):
        if ratio[side]:
            summary[f"cross_gram_{side}_after_over_before_mean"] = statistics.mean(ratio[side])
            summary[f"cross_gram_{side}_after_over_before_max"] = max(ratio[side])
        summary[f"delta_{side}_max"] = delta[side]
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path, required=True)
    ap.add_argument("--name", required=True, help="result key of this setting")
    ap.add_argument("--param", action="append", default=[], help="k=v, a do_merging orthogonalization parameter")
    ap.add_argument("--splits", default="validation")
    args = ap.parse_args()
    set_threads(1)
    from peft import PeftModel

    method = get_method("do_merging")
    params = method.resolve_params(dict(kv.split("=", 1) for kv in args.param))
    settings = OrthoSettings.from_params(params)
    tasks = sorted(json.loads((args.cache / RESULTS).read_text()))
    t0 = time.time()
    dest = args.cache / "ortho" / args.name
    summary = orthogonalized_adapters(args.cache, tasks, settings, dest)
    ortho_s = time.time() - t0
    tok = load_tokenizer(model_dir(args.cache))
    splits = args.splits.split(",")
    acc: dict[str, dict[str, float]] = {s: {} for s in splits}
    for t in tasks:
        data, head = load_task(args.cache, t), load_head(args.cache / HEADS_SUBDIR / f"{t}.safetensors")
        model = PeftModel.from_pretrained(load_backbone(model_dir(args.cache)), dest / t).eval()
        for s in splits:
            f = features(model, tok, [r["text"] for r in data[s]], MAX_LEN)
            acc[s][t] = accuracy(head, f, [r["label"] for r in data[s]])
        print(f"[{args.name}] {t}: " + " ".join(f"{s} {acc[s][t]:.3f}" for s in splits), flush=True)
    shutil.rmtree(dest, ignore_errors=True)
    path = args.cache / OUT
    results = json.loads(path.read_text()) if path.exists() else {}
    results[args.name] = {"params": dict(kv.split("=", 1) for kv in args.param), "accuracy": acc, **summary,
                          "seconds_orthogonalize": round(ortho_s, 1)}
    write_json(path, results)
    print(json.dumps(results[args.name], indent=1))


if __name__ == "__main__":
    main()
