"""Shared pieces of the merge-quality benchmark: cache layout, JSONL tasks, the pooled
classification model (frozen or LoRA backbone + per-task linear head) and evaluation.

The backbone is a bare ``AutoModel`` (no LM head: the 49k-vocabulary projection would be
most of the compute and is never used); features are the mean of the last hidden state over
the non-padding tokens; each task has its own ``nn.Linear`` head kept outside the adapter.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
DEFAULT_CACHE = Path(os.environ.get("STREAMMERGE_QUALITY_CACHE", HERE / ".cache"))
MODEL_SUBDIR = "smollm2-135m-instruct"
TASKS_SUBDIR = "tasks"
ADAPTERS_SUBDIR = "adapters"
HEADS_SUBDIR = "heads"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SPLITS = ("train", "validation", "test")
FAMILY_FILE = "family.json"  # written by prepare_encoder.py: which model dir and LoRA targets a cache uses


def family(cache: Path) -> dict[str, Any]:
    """The model family of a cache: ``{"model_subdir", "lora_targets"}``; the decoder's without a family file."""
    path = cache / FAMILY_FILE
    if path.exists():
        return json.loads(path.read_text())
    return {"model_subdir": MODEL_SUBDIR, "lora_targets": LORA_TARGETS}


def model_dir(cache: Path) -> Path:
    return cache / family(cache)["model_subdir"]


# ---------------------------------------------------------------- files

def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")
    tmp.replace(path)


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def load_task(cache: Path, task: str) -> dict[str, Any]:
    """A task's meta (labels, description) and its three splits as lists of {text, label}."""
    root = cache / TASKS_SUBDIR / task
    meta = json.loads((root / "meta.json").read_text())
    for split in SPLITS:
        meta[split] = read_jsonl(root / f"{split}.jsonl")
    return meta


def task_names(cache: Path) -> list[str]:
    index = json.loads((cache / TASKS_SUBDIR / "index.json").read_text())
    return list(index["tasks"])


# ---------------------------------------------------------------- model

def set_threads(n: int) -> None:
    """The machine has 2 shared cores: one thread leaves the other to everyone else."""
    torch.set_num_threads(n)


def load_backbone(model_dir: Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    from transformers import AutoModel

    model = AutoModel.from_pretrained(model_dir, dtype=dtype)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def tokenize(tok: Any, texts: Sequence[str], max_len: int) -> dict[str, torch.Tensor]:
    return tok(list(texts), padding=True, truncation=True, max_length=max_len, return_tensors="pt")


def pooled(backbone: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean of the last hidden state over the real (non-padding) tokens, fp32."""
    out = backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    h = out.last_hidden_state.float()
    mask = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
    return (h * mask).sum(1) / mask.sum(1).clamp_min(1.0)


def make_head(hidden: int, n_labels: int, seed: int) -> nn.Linear:
    gen = torch.Generator().manual_seed(seed)
    head = nn.Linear(hidden, n_labels)
    with torch.no_grad():
        head.weight.copy_(torch.randn(n_labels, hidden, generator=gen) * 0.01)
        head.bias.zero_()
    return head


def save_head(head: nn.Linear, path: Path, meta: dict[str, str]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"weight": head.weight.detach().contiguous(), "bias": head.bias.detach().contiguous()},
              str(path), metadata=meta)


def load_head(path: Path) -> nn.Linear:
    from safetensors.torch import load_file

    sd = load_file(str(path))
    head = nn.Linear(sd["weight"].shape[1], sd["weight"].shape[0])
    head.load_state_dict(sd)
    return head


@torch.no_grad()
def features(backbone: nn.Module, tok: Any, texts: Sequence[str], max_len: int,
             batch_size: int = 64) -> torch.Tensor:
    """Pooled features of ``texts``, batched after sorting by length (less padding)."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    feats = torch.empty(len(texts), backbone.config.hidden_size)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = tokenize(tok, [texts[i] for i in idx], max_len)
        feats[idx] = pooled(backbone, batch)
    return feats


@torch.no_grad()
def accuracy(head: nn.Linear, feats: torch.Tensor, labels: Sequence[int]) -> float:
    pred = head(feats).argmax(-1)
    return float((pred == torch.tensor(labels)).float().mean())
