"""What a GGUF base stands for on the Hugging Face side: ``config.json`` and the tokenizer files.

The config is rebuilt from the GGUF metadata, key by key the inverse of what llama.cpp's
``convert_hf_to_gguf.py`` writes for Llama / Mistral (``llama``), Qwen2 and Qwen3 (block count,
context length, sizes, head counts, head dim, RoPE base and scaling, RMS-norm epsilon, special
token ids); the vocabulary size and tied embeddings come from the tensors.  Llama-3 RoPE scaling
is stored only as the generated ``rope_freqs`` tensor: its parameters are taken as Llama 3.1's
(low/high frequency factors 1 and 4, original context 8192, factor = the largest value) and kept
only when they regenerate the stored tensor exactly.  The tokenizer is rebuilt by transformers'
GGUF tokenizer conversion (``tokenizer.json`` and ``tokenizer_config.json``), when transformers
is installed.
"""

from __future__ import annotations

import importlib.util
import json
import math
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from .gguf_checkpoint import GGUFCheckpoint

__all__ = ["HF_ARCHITECTURES", "TOKENIZER_FILES", "gguf_hf_config", "tokenizer_available", "tokenizer_files"]

# llama.cpp architecture → (HF class, model_type); Mistral's GGUF says "llama" and loads as Llama.
HF_ARCHITECTURES = {"llama": ("LlamaForCausalLM", "llama"), "qwen2": ("Qwen2ForCausalLM", "qwen2"),
                    "qwen3": ("Qwen3ForCausalLM", "qwen3")}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
_ARCH_KEYS = (  # GGUF key (after "<arch>.") → config.json key
    ("block_count", "num_hidden_layers"), ("context_length", "max_position_embeddings"),
    ("embedding_length", "hidden_size"), ("feed_forward_length", "intermediate_size"),
    ("attention.head_count", "num_attention_heads"), ("attention.head_count_kv", "num_key_value_heads"),
    ("attention.key_length", "head_dim"), ("rope.freq_base", "rope_theta"),
    ("attention.layer_norm_rms_epsilon", "rms_norm_eps"),
)
_TOKEN_KEYS = (("tokenizer.ggml.bos_token_id", "bos_token_id"), ("tokenizer.ggml.eos_token_id", "eos_token_id"),
               ("tokenizer.ggml.padding_token_id", "pad_token_id"))
LLAMA3_DEFAULTS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
EMBED = "model.embed_tokens.weight"


def _llama3_factors(theta: float, dim: int, factor: float, low: float, high: float, old_ctx: int) -> np.ndarray:
    freqs = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    wavelen = 2 * math.pi / freqs
    smooth = (old_ctx / wavelen - low) / (high - low)
    mid = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < old_ctx / high, 1.0, np.where(wavelen > old_ctx / low, factor, mid)).astype(np.float32)


def _rope_scaling(layout: GGUFCheckpoint, config: dict[str, Any], strict: bool) -> dict[str, Any] | None:
    base, arch = layout.gguf, layout.gguf.arch
    kind = base.value(f"{arch}.rope.scaling.type", "")
    factor = base.value(f"{arch}.rope.scaling.factor", 0.0)
    if kind in ("linear", "yarn") and factor:
        scaling: dict[str, Any] = {"rope_type": kind, "factor": float(factor)}
        orig = base.value(f"{arch}.rope.scaling.original_context_length", 0)
        if orig:
            scaling["original_max_position_embeddings"] = int(orig)
        return scaling
    if kind not in ("", "none"):
        if not strict:
            return None
        raise InputError(f"GGUF base {str(base.path)!r}: RoPE scaling {kind!r} cannot be written back to an HF "
                         "config.json; use --output-format gguf")
    stored = next((r for r in base.readers for t in r.tensors if t.name == "rope_freqs.weight"), None)
    if stored is None:
        return None
    values = np.asarray(next(t for t in stored.tensors if t.name == "rope_freqs.weight").data, dtype=np.float32)
    dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    scaling = {"rope_type": "llama3", "factor": float(values.max()), **LLAMA3_DEFAULTS}
    again = _llama3_factors(config.get("rope_theta", 10000.0), dim, scaling["factor"], 1.0, 4.0, 8192)
    if again.shape != values.shape or not np.allclose(again, values, rtol=1e-6, atol=0):
        if not strict:
            return None
        raise InputError(f"GGUF base {str(base.path)!r}: its rope_freqs tensor (Llama-3 RoPE scaling) is not "
                         f"Llama 3.1's (factor {scaling['factor']}, frequency factors 1 and 4, original context "
                         "8192), and the GGUF does not store the parameters; use --output-format gguf")
    return scaling


def gguf_hf_config(layout: GGUFCheckpoint, strict: bool = True) -> dict[str, Any]:
    """The ``config.json`` of the HF model a GGUF base was converted from (as far as GGUF records it).

    Args:
        layout: the GGUF base.
        strict: raise ``InputError`` when the RoPE scaling cannot be written back (for an HF output);
            False leaves ``rope_scaling`` out instead (the planner only needs the sizes and the class).
    """
    base = layout.gguf
    hf_class, model_type = HF_ARCHITECTURES[base.arch]
    config: dict[str, Any] = {"architectures": [hf_class], "model_type": model_type}
    for key, hf_key in _ARCH_KEYS:
        field = base.fields.get(f"{base.arch}.{key}")
        if field is not None:
            value = field.contents()  # GGUF floats are float32: keep their shortest spelling (1e-05)
            config[hf_key] = float(str(np.float32(value))) if isinstance(value, float) else value
    for key, hf_key in _TOKEN_KEYS:
        if key in base.fields:
            config[hf_key] = int(base.fields[key].contents())
    if EMBED in layout.shard_of:
        config["vocab_size"] = layout.info(EMBED).shape[0]
    config["tie_word_embeddings"] = "lm_head.weight" not in layout.shard_of
    config["attention_bias"] = any(n.endswith("q_proj.bias") for n in layout.shard_of) and base.arch == "llama"
    if (scaling := _rope_scaling(layout, config, strict)) is not None:
        config["rope_scaling"] = scaling
    config["torch_dtype"] = "float32"
    return config


def tokenizer_available() -> bool:
    """Whether the tokenizer files can be rebuilt (transformers' GGUF conversion is importable)."""
    return importlib.util.find_spec("transformers") is not None


def tokenizer_files(gguf_path: Path) -> dict[str, bytes]:
    """``tokenizer.json`` and ``tokenizer_config.json`` of a GGUF model, by transformers' GGUF conversion.

    Raises:
        InputError: transformers is missing or cannot convert this tokenizer.
    """
    try:
        from transformers import AutoTokenizer
    except ImportError as e:
        raise InputError("rebuilding the tokenizer of a GGUF base needs transformers; pip install transformers") from e
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    except Exception as e:  # transformers raises many kinds for a tokenizer it cannot convert
        raise InputError(f"transformers cannot rebuild the tokenizer of {str(gguf_path)!r}: {e}") from e
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        out = {name: (Path(tmp) / name).read_bytes() for name in TOKENIZER_FILES}
        template = Path(tmp) / "chat_template.jinja"
        config = json.loads(out["tokenizer_config.json"])
        if template.is_file():  # one file fewer: tokenizer_config.json carries the template itself
            config["chat_template"] = template.read_text(encoding="utf-8")
        for key in ("is_local", "local_files_only", "name_or_path"):
            config.pop(key, None)
        out["tokenizer_config.json"] = (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode()
    return out
