"""transformers' side of the llama.cpp comparison: perplexity and log-probabilities on llama.cpp's tokens.

``llama-perplexity --kl-divergence-base FILE`` saves the evaluation tokens and, per scored position,
the log-probabilities of the whole vocabulary (16-bit, per-row scale and offset); ``--kl-divergence``
then compares another model against that file.  Here transformers plays the base: it reads the
tokens from a file llama.cpp wrote, runs the HF model on exactly llama.cpp's chunks (``n_ctx``
tokens each, the first replaced by BOS when the vocabulary adds one, the last ``n_ctx/2 - 1``
predictions scored), and writes its own log-probabilities in llama.cpp's format, so llama.cpp's
own KL-divergence statistics measure how far each GGUF is from transformers.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np
import torch

MAGIC = b"_logits_"


def read_tokens(path: Path) -> tuple[int, int, np.ndarray]:
    """``(n_ctx, n_vocab, tokens[n_chunk, n_ctx])`` from a llama-perplexity log-probability file."""
    with open(path, "rb") as f:
        if f.read(8) != MAGIC:
            raise SystemExit(f"{path} is not a llama-perplexity --kl-divergence-base file (no '_logits_' magic)")
        n_ctx, n_vocab, n_chunk = struct.unpack("<iii", f.read(12))
        tokens = np.frombuffer(f.read(4 * n_ctx * n_chunk), dtype=np.int32).reshape(n_chunk, n_ctx)
    return n_ctx, n_vocab, tokens


def compress(logits: torch.Tensor) -> np.ndarray:
    """llama.cpp's 16-bit log-probability rows (perplexity.cpp's ``log_softmax`` with a stream):
    two float32 (scale, min log-prob) then ``round((logit - min) / scale)`` per token, padded to even."""
    rows, n_vocab = logits.shape
    nv = 2 * ((n_vocab + 1) // 2) + 4
    logits = logits.float()
    max_l = logits.max(dim=1).values
    min_l = logits.min(dim=1).values
    log_sum_exp = torch.log(torch.exp(logits - max_l[:, None]).double().sum(dim=1)).float()
    min_log_prob = min_l - max_l - log_sum_exp
    scale = (max_l - min_l) / 65535.0
    q = torch.where(logits > min_l[:, None], torch.round((logits - min_l[:, None]) / scale[:, None]),
                    torch.zeros_like(logits))
    out = np.zeros((rows, nv), dtype=np.uint16)
    head = np.stack([scale.numpy(), min_log_prob.numpy()], axis=1).astype(np.float32)
    out[:, :4] = head.view(np.uint16).reshape(rows, 4)
    out[:, 4:4 + n_vocab] = q.clamp(0, 65535).to(torch.int32).numpy().astype(np.uint16)
    return out


def reference(model_dir: Path, llama_file: Path, out_file: Path, add_bos: bool, bos_id: int,
              threads: int = 2) -> dict[str, float]:
    """Perplexity of the HF model (float32 compute) on llama.cpp's tokens; writes ``out_file``."""
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    n_ctx, n_vocab, tokens = read_tokens(llama_file)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    if model.config.vocab_size != n_vocab:
        raise SystemExit(f"{model_dir} has vocab_size {model.config.vocab_size}, llama.cpp's file {n_vocab}")
    first = n_ctx // 2
    nll = 0.0
    count = 0
    with open(out_file, "wb") as f:
        f.write(MAGIC + struct.pack("<iii", n_ctx, n_vocab, tokens.shape[0]))
        f.write(tokens.astype(np.int32).tobytes())
        for chunk in tokens:
            ids = torch.tensor(chunk, dtype=torch.long)
            if add_bos:
                ids[0] = bos_id
            with torch.no_grad():
                logits = model(input_ids=ids[None]).logits[0, first:n_ctx - 1].float()
            target = torch.tensor(chunk[first + 1:], dtype=torch.long)
            logp = torch.log_softmax(logits.double(), dim=-1)
            nll -= float(logp.gather(1, target[:, None]).sum())
            count += target.numel()
            f.write(compress(logits).tobytes())
    return {"ppl": math.exp(nll / count), "scored_tokens": count, "chunks": int(tokens.shape[0]), "n_ctx": n_ctx}
