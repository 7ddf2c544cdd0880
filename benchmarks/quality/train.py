"""Train one PEFT LoRA adapter per task on the frozen base, plus the bounds the merges are
judged against:

* **head only** (lower bound): a linear probe (``nn.Linear`` on the mean-pooled last hidden
  state of the frozen base), trained full-batch on cached features;
* **individual** (upper bound): LoRA (r 16, α 32, q/k/v/o + gate/up/down) trained jointly
  with its head, which starts from the probe (LP-FT: the adapter does not have to undo a
  random head's gradients in a few hundred CPU steps).

Outputs in the cache: ``adapters/<task>/`` (``save_pretrained``: safetensors + config; the
head is not in it), ``heads/<task>.safetensors`` (the jointly trained head, the one every
merged backbone is evaluated with), ``heads/<task>.probe.safetensors``, ``base_features/``
and ``train_results.json`` (accuracies, steps, seconds). A task whose adapter exists is
skipped, so re-running after an interruption only trains what is missing.

    .venv/bin/python benchmarks/quality/train.py [--cache DIR] [--tasks a,b] [--steps 60]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (ADAPTERS_SUBDIR, DEFAULT_CACHE, HEADS_SUBDIR, accuracy,  # noqa: E402
                    family, features, load_backbone, load_task, load_tokenizer, make_head, pooled,
                    save_head, set_threads, task_names, tokenize, write_json)

MAX_LEN = int(os.environ.get("STREAMMERGE_QUALITY_MAX_LEN", "32"))  # tokens; the suite uses 24
RESULTS = "train_results.json"


def train_probe(head: nn.Linear, feats: torch.Tensor, labels: list[int], steps: int = 300,
                lr: float = 1e-2, weight_decay: float = 1e-3) -> None:
    """Full-batch Adam on standardised-by-nothing features (the head is what gets reused)."""
    y = torch.tensor(labels)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(steps):
        loss = nn.functional.cross_entropy(head(feats), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def base_features(cache: Path, task: str, data: dict, backbone: nn.Module, tok: object) -> dict[str, torch.Tensor]:
    path = cache / "base_features" / f"{task}.pt"
    if path.exists():
        return torch.load(path)
    feats = {s: features(backbone, tok, [r["text"] for r in data[s]], MAX_LEN) for s in ("train", "validation", "test")}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(feats, path)
    return feats


def train_lora(model_dir: Path, tok: object, data: dict, head: nn.Linear, args: argparse.Namespace,
               seed: int) -> tuple[nn.Module, list[float]]:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    backbone = load_backbone(model_dir)
    config = LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0, target_modules=args.lora_targets,
                        bias="none")
    model = get_peft_model(backbone, config)
    lora_params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": lora_params, "lr": args.lr},
                             {"params": head.parameters(), "lr": args.head_lr}], weight_decay=0.0)
    warmup = max(1, args.steps // 6)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps))))
    rows = list(data["train"])
    rng = random.Random(seed)
    order: list[dict] = []
    losses = []
    model.train()
    t0 = time.time()
    for _ in range(args.steps):
        if len(order) < args.batch:
            rng.shuffle(rows)
            order += rows
        batch, order = order[:args.batch], order[args.batch:]
        enc = tokenize(tok, [r["text"] for r in batch], MAX_LEN)
        loss = nn.functional.cross_entropy(head(pooled(model, enc)), torch.tensor([r["label"] for r in batch]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if len(losses) % 10 == 0:
            print(f"  step {len(losses)}: loss {sum(losses[-10:]) / 10:.3f} ({time.time() - t0:.0f} s)", flush=True)
    model.eval()
    return model, losses


def task_seed(task: str) -> int:
    return int.from_bytes(hashlib.sha256(task.encode()).digest()[:4], "big") % 100_000


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--tasks", help="comma-separated subset (default: all built tasks)")
    ap.add_argument("--steps", type=int, default=30, help="optimizer steps per adapter")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3, help="LoRA learning rate (cosine, 1/6 warm-up)")
    ap.add_argument("--head-lr", type=float, default=1e-3)
    ap.add_argument("--head-init", choices=("probe", "random"), default="probe",
                    help="start the jointly trained head from the linear probe (LP-FT) or from random weights: "
                         "the probe fits the 960 training texts almost exactly, leaving LoRA little gradient")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    set_threads(args.threads)
    model_dir = args.cache / family(args.cache)["model_subdir"]
    args.lora_targets = family(args.cache)["lora_targets"]
    tok = load_tokenizer(model_dir)
    tasks = args.tasks.split(",") if args.tasks else task_names(args.cache)
    results_path = args.cache / RESULTS
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    frozen = None
    for task in tasks:
        adapter_dir = args.cache / ADAPTERS_SUBDIR / task
        if (adapter_dir / "adapter_model.safetensors").exists() and task in results:
            print(f"[{task}] adapter exists, skipped", flush=True)
            continue
        data = load_task(args.cache, task)
        n_labels = len(data["labels"])
        t0 = time.time()
        if frozen is None:
            frozen = load_backbone(model_dir)
        feats = base_features(args.cache, task, data, frozen, tok)
        t_feats = time.time() - t0
        seed = args.seed + task_seed(task)  # from the name: the same per task whatever --tasks lists
        probe = make_head(frozen.config.hidden_size, n_labels, seed=seed)
        train_probe(probe, feats["train"], [r["label"] for r in data["train"]])
        probe_acc = {s: accuracy(probe, feats[s], [r["label"] for r in data[s]]) for s in ("validation", "test")}
        save_head(probe, args.cache / HEADS_SUBDIR / f"{task}.probe.safetensors", {"task": task, "kind": "probe"})
        print(f"[{task}] head only: val {probe_acc['validation']:.3f} test {probe_acc['test']:.3f} "
              f"({t_feats:.0f} s features)", flush=True)

        head = make_head(frozen.config.hidden_size, n_labels, seed=seed + 2000)
        if args.head_init == "probe":  # LP-FT; "random": head and LoRA trained jointly from scratch
            head.load_state_dict(probe.state_dict())
        t1 = time.time()
        model, losses = train_lora(model_dir, tok, data, head, args, seed=seed + 1000)
        t_train = time.time() - t1
        acc = {}
        for split in ("validation", "test"):
            f = features(model, tok, [r["text"] for r in data[split]], MAX_LEN)
            acc[split] = accuracy(head, f, [r["label"] for r in data[split]])
        t_eval = time.time() - t1 - t_train
        k = max(1, min(10, len(losses) // 3))  # mean loss over the first / last k steps
        model.save_pretrained(adapter_dir, safe_serialization=True)
        save_head(head, args.cache / HEADS_SUBDIR / f"{task}.safetensors", {"task": task, "kind": "lora"})
        results[task] = {"head_only": probe_acc, "individual": acc, "labels": data["labels"],
                         "steps": args.steps, "batch": args.batch, "lr": args.lr, "rank": args.rank,
                         "alpha": args.alpha, "max_len": MAX_LEN, "head_init": args.head_init, "head_lr": args.head_lr, "loss_start": sum(losses[:k]) / k,
                         "loss_end": sum(losses[-k:]) / k, "seconds": {"features": round(t_feats, 1),
                         "train": round(t_train, 1), "eval": round(t_eval, 1)}}
        if results_path.exists():  # another train.py (a disjoint --tasks list) may have written since
            results = {**json.loads(results_path.read_text()), task: results[task]}
        write_json(results_path, results)
        print(f"[{task}] LoRA: val {acc['validation']:.3f} test {acc['test']:.3f} | loss "
              f"{results[task]['loss_start']:.3f} -> {results[task]['loss_end']:.3f} | train {t_train:.0f} s, "
              f"eval {t_eval:.0f} s", flush=True)
        del model


if __name__ == "__main__":
    main()
