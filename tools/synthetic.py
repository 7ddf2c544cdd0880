"""Synthetic Hugging Face models and PEFT LoRA adapters with real Llama / Qwen2 shapes.

Weights are random (seeded per tensor), written tensor by tensor in bounded chunks with
streammerge's streaming writer, so even the 8b preset needs well under 1 GB of memory.

    python tools/synthetic.py model --preset 1b --out /tmp/base1b
    python tools/synthetic.py adapter --model /tmp/base1b --out /tmp/lora1 --rank 16 --seed 1
    python tools/synthetic.py adapter --model /tmp/base1b --out /tmp/dora1 --rank 16 --seed 1 --dora
    python tools/synthetic.py finetune --model /tmp/base1b --out /tmp/ft1 --seed 1
    python tools/synthetic.py finetune --model /tmp/base1b --out /tmp/ft1 --seed 1 --rank 8  # low-rank + noise
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from streammerge.io.dtypes import DTYPE_ALIASES, DTYPES, byte_size  # noqa: E402
from streammerge.io.reader import CheckpointReader, open_checkpoint  # noqa: E402
from streammerge.io.writer import ShardWriter, layout_shard, save_tensors, write_index  # noqa: E402
from streammerge.names import (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, CONFIG_NAME,  # noqa: E402
                               SHARD_NAME_TEMPLATE, SINGLE_FILE_NAME)
from streammerge.recipe import parse_size  # noqa: E402

CHUNK_ELEMENTS = 1 << 22
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Preset:
    """Architecture hyper-parameters of a synthetic model (the real model's shapes)."""

    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool
    qkv_bias: bool = False
    rope_theta: float = 500000.0

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


PRESETS: dict[str, Preset] = {
    "tiny": Preset("llama", 64, 128, 2, 4, 2, 512, tied=False),
    "tiny-tied": Preset("llama", 64, 128, 2, 4, 2, 512, tied=True),
    "tiny-qwen2": Preset("qwen2", 64, 160, 2, 4, 2, 512, tied=True, qkv_bias=True, rope_theta=1e6),
    "small": Preset("llama", 512, 1408, 8, 8, 4, 8192, tied=False),
    "1b": Preset("llama", 2048, 8192, 16, 32, 8, 128256, tied=True),  # Llama-3.2-1B
    "8b": Preset("llama", 4096, 14336, 32, 32, 8, 128256, tied=False),  # Llama-3-8B
    "70b-slice": Preset("llama", 8192, 28672, 2, 64, 8, 128256, tied=False),  # Llama-3-70B, k layers
    "qwen2-0.5b": Preset("qwen2", 896, 4864, 24, 14, 2, 151936, tied=True, qkv_bias=True, rope_theta=1e6),
}


def tensor_shapes(p: Preset) -> dict[str, tuple[int, ...]]:
    """Every tensor of the checkpoint, with the names and shapes transformers uses."""
    h, i, q, kv = p.hidden, p.intermediate, p.heads * p.head_dim, p.kv_heads * p.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (p.vocab, h)}
    for n in range(p.layers):
        pre = f"model.layers.{n}."
        shapes.update({
            pre + "input_layernorm.weight": (h,),
            pre + "self_attn.q_proj.weight": (q, h),
            pre + "self_attn.k_proj.weight": (kv, h),
            pre + "self_attn.v_proj.weight": (kv, h),
            pre + "self_attn.o_proj.weight": (h, q),
            pre + "mlp.gate_proj.weight": (i, h),
            pre + "mlp.up_proj.weight": (i, h),
            pre + "mlp.down_proj.weight": (h, i),
            pre + "post_attention_layernorm.weight": (h,),
        })
        if p.qkv_bias:
            shapes.update({pre + "self_attn.q_proj.bias": (q,), pre + "self_attn.k_proj.bias": (kv,),
                           pre + "self_attn.v_proj.bias": (kv,)})
    shapes["model.norm.weight"] = (h,)
    if not p.tied:
        shapes["lm_head.weight"] = (p.vocab, h)
    return shapes


def hf_config(p: Preset, dtype: str) -> dict[str, object]:
    """A config.json transformers' AutoConfig reads for this preset."""
    arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[p.model_type]
    config: dict[str, object] = {
        "architectures": [arch], "model_type": p.model_type, "hidden_size": p.hidden,
        "intermediate_size": p.intermediate, "num_hidden_layers": p.layers,
        "num_attention_heads": p.heads, "num_key_value_heads": p.kv_heads, "head_dim": p.head_dim,
        "vocab_size": p.vocab, "tie_word_embeddings": p.tied, "hidden_act": "silu",
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": p.rope_theta,
        "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": str(DTYPES[dtype].torch_dtype).removeprefix("torch."),
    }
    if p.model_type == "llama":
        config["attention_bias"] = False
        config["mlp_bias"] = False
    return config


def _seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


def _fill(name: str, shape: tuple[int, ...], seed: int, std: float, torch_dtype: torch.dtype,
          ones: bool = False):
    """Yield the tensor's values in chunks of at most CHUNK_ELEMENTS (flattened order)."""
    numel = 1
    for d in shape:
        numel *= d
    gen = torch.Generator().manual_seed(_seed(seed, name))
    for start in range(0, numel, CHUNK_ELEMENTS):
        count = min(CHUNK_ELEMENTS, numel - start)
        if ones:
            chunk = 1.0 + 0.1 * torch.randn(count, generator=gen)
        else:
            chunk = torch.randn(count, generator=gen).mul_(std)
        yield chunk.to(torch_dtype)


def write_model(out: Path, preset: Preset, dtype: str = "BF16", seed: int = 0,
                max_shard_size: int = 5 * 10**9, std: float = 0.02) -> Path:
    """Write a synthetic model directory: config.json, shard(s), index when sharded."""
    out.mkdir(parents=True, exist_ok=True)
    shapes = tensor_shapes(preset)
    torch_dtype = DTYPES[dtype].torch_dtype
    buckets: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = byte_size(dtype, shape)
        if buckets[-1] and size + nbytes > max_shard_size:
            buckets.append([])
            size = 0
        buckets[-1].append(name)
        size += nbytes
    files = ([SINGLE_FILE_NAME] if len(buckets) == 1 else
             [SHARD_NAME_TEMPLATE.format(index=i + 1, count=len(buckets)) for i in range(len(buckets))])
    weight_map = {}
    total = 0
    for file, names in zip(files, buckets):
        layout = layout_shard((n, dtype, shapes[n]) for n in names)
        with ShardWriter(out / file, layout) as writer:
            for slot in layout.slots:
                is_norm = slot.name.endswith("norm.weight")
                std_here = 0.0 if slot.name.endswith(".bias") else std
                for chunk in _fill(slot.name, slot.shape, seed, std_here or 0.01, torch_dtype, ones=is_norm):
                    writer.write_bytes(slot.name, memoryview(chunk.view(torch.uint8).numpy()))
            writer.commit()
        weight_map.update({n: file for n in names})
        total += layout.data_size
    if len(files) > 1:
        write_index(out, weight_map, total)
    (out / CONFIG_NAME).write_text(json.dumps(hf_config(preset, dtype), indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}) + "\n")
    return out


def module_shapes(model: Path, targets: tuple[str, ...], layers: set[int] | None = None) -> dict[str, tuple[int, ...]]:
    """Base tensors ``...<target>.weight`` of a model directory (from its headers)."""
    layout = open_checkpoint(model)
    found = {}
    for name in layout.tensor_names:
        parts = name.split(".")
        if len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in targets:
            if layers is not None and "layers" in parts and int(parts[parts.index("layers") + 1]) not in layers:
                continue
            found[name[: -len(".weight")]] = layout.info(name).shape
    return found


def dora_magnitude(reader: CheckpointReader, weight: str, up: torch.Tensor, down: torch.Tensor,
                   gen: torch.Generator) -> torch.Tensor:
    """A trained-looking DoRA magnitude: ``‖W0 + s·B·A‖`` per output row (PEFT's initial ``m``, with ``up = s·B``)
    times ``1 + 0.05·N(0, 1)``; the base is read in row blocks of at most CHUNK_ELEMENTS."""
    rows, cols = reader.layout.info(weight).shape
    step = max(1, CHUNK_ELEMENTS // cols)
    norms = torch.cat([torch.linalg.vector_norm(reader.read_rows(weight, start, min(rows, start + step),
                                                                 torch.float32).addmm_(up[start:start + step], down),
                                                dim=1)
                       for start in range(0, rows, step)])
    return norms * (1 + 0.05 * torch.randn(rows, generator=gen))


def write_adapter(model: Path, out: Path, rank: int = 16, alpha: float | None = None,
                  targets: tuple[str, ...] = LLAMA_TARGETS, seed: int = 1, b_std: float = 0.01,
                  use_rslora: bool = False, dtype: str = "F32", dora: bool = False) -> Path:
    """Write a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors) for ``model``.

    A ~ N(0, 1/d_in) (PEFT's Kaiming-style init), B ~ N(0, b_std²): a trained-looking, non-zero update.
    ``dora``: a DoRA adapter (``use_dora: true``, one ``lora_magnitude_vector`` per module, see
    ``dora_magnitude``; reads the base weights of the targeted modules).
    """
    out.mkdir(parents=True, exist_ok=True)
    alpha = float(2 * rank if alpha is None else alpha)
    scale = alpha / (rank ** 0.5 if use_rslora else rank)
    torch_dtype = DTYPES[dtype].torch_dtype
    tensors = {}
    reader = CheckpointReader(open_checkpoint(model)) if dora else None
    for module, shape in module_shapes(model, targets).items():
        d_out, d_in = shape
        gen = torch.Generator().manual_seed(_seed(seed, module))
        a = torch.randn(rank, d_in, generator=gen) / d_in ** 0.5
        b = torch.randn(d_out, rank, generator=gen) * b_std
        tensors[f"base_model.model.{module}.lora_A.weight"] = a.to(torch_dtype)
        tensors[f"base_model.model.{module}.lora_B.weight"] = b.to(torch_dtype)
        if reader is not None:
            magnitude = dora_magnitude(reader, module + ".weight", b.to(torch_dtype).float() * scale,
                                       a.to(torch_dtype).float(), gen)
            tensors[f"base_model.model.{module}.lora_magnitude_vector"] = magnitude.to(torch_dtype)
    if reader is not None:
        reader.close()
    if not tensors:
        raise SystemExit(f"no modules named {targets} in {model}")
    save_tensors(out / ADAPTER_WEIGHTS_NAME, tensors)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha,
        "target_modules": sorted(targets), "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
        "use_rslora": use_rslora, "use_dora": dora, "init_lora_weights": True, "inference_mode": True,
        "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None,
        "base_model_name_or_path": str(model),
    }
    model_config = json.loads((model / CONFIG_NAME).read_text()) if (model / CONFIG_NAME).is_file() else {}
    if model_config.get("architectures"):
        model_type = model_config.get("model_type", "")
        config["auto_mapping"] = {"base_model_class": model_config["architectures"][0],
                                  "parent_library": f"transformers.models.{model_type}.modeling_{model_type}"}
    (out / ADAPTER_CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return out


def write_finetune(model: Path, out: Path, seed: int = 1, std: float = 0.001, rank: int = 0) -> Path:
    """A synthetic full fine-tune: ``model`` plus seeded noise on every 2-D tensor, same layout.

    ``rank > 0``: the change of each 2-D tensor is mostly low-rank, as a real fine-tune's is: a product
    ``U V`` of rank ``rank`` (entries of std ``std``) plus noise of std ``std / 10``.
    """
    out.mkdir(parents=True, exist_ok=True)
    layout = open_checkpoint(model)
    weight_map = {}
    with CheckpointReader(layout) as reader:
        for shard in layout.shards:
            header = layout.headers[shard]
            shard_layout = layout_shard((t.name, t.dtype, t.shape) for t in header.tensors.values())
            with ShardWriter(out / shard.name, shard_layout) as writer:
                for slot in shard_layout.slots:
                    tensor = reader.read(slot.name)
                    if tensor.ndim == 2 and tensor.is_floating_point():
                        gen = torch.Generator().manual_seed(_seed(seed, slot.name))
                        noise = torch.randn(tensor.shape, generator=gen).mul_(std if not rank else std / 10)
                        if rank:
                            u = torch.randn(tensor.shape[0], rank, generator=gen)
                            v = torch.randn(rank, tensor.shape[1], generator=gen)
                            noise.addmm_(u, v, alpha=std / rank ** 0.5)
                        tensor = (tensor.float() + noise).to(tensor.dtype)
                    writer.write_tensor(slot.name, tensor)
                    del tensor
                writer.commit()
            weight_map.update({n: shard.name for n in header.tensors})
    if layout.index_path is not None:
        write_index(out, weight_map, layout.total_bytes)
    for extra in (CONFIG_NAME, "generation_config.json"):
        if (model / extra).is_file():
            (out / extra).write_bytes((model / extra).read_bytes())
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    m = sub.add_parser("model", help="a synthetic base model")
    m.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    m.add_argument("--layers", type=int, default=None, help="override the number of layers")
    m.add_argument("--dtype", default="bfloat16")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--max-shard-size", default="5GB")
    m.add_argument("--out", type=Path, required=True)
    a = sub.add_parser("adapter", help="a PEFT LoRA adapter for a model directory")
    a.add_argument("--model", type=Path, required=True)
    a.add_argument("--out", type=Path, required=True)
    a.add_argument("--rank", type=int, default=16)
    a.add_argument("--alpha", type=float, default=None, help="lora_alpha (default 2 × rank)")
    a.add_argument("--targets", default=",".join(LLAMA_TARGETS))
    a.add_argument("--seed", type=int, default=1)
    a.add_argument("--b-std", type=float, default=0.01)
    a.add_argument("--rslora", action="store_true")
    a.add_argument("--dora", action="store_true", help="a DoRA adapter (use_dora, lora_magnitude_vector)")
    f = sub.add_parser("finetune", help="a synthetic full fine-tune of a model directory")
    f.add_argument("--model", type=Path, required=True)
    f.add_argument("--out", type=Path, required=True)
    f.add_argument("--seed", type=int, default=1)
    f.add_argument("--std", type=float, default=0.001)
    f.add_argument("--rank", type=int, default=0, help="a mostly low-rank change of this rank (0: noise only)")
    args = parser.parse_args(argv)
    if args.what == "model":
        preset = PRESETS[args.preset]
        if args.layers is not None:
            preset = replace(preset, layers=args.layers)
        dtype = DTYPE_ALIASES.get(args.dtype.lower(), args.dtype.upper())
        write_model(args.out, preset, dtype, args.seed, parse_size(args.max_shard_size))
    elif args.what == "adapter":
        write_adapter(args.model, args.out, args.rank, args.alpha, tuple(args.targets.split(",")), args.seed,
                      args.b_std, args.rslora, dora=args.dora)
    else:
        write_finetune(args.model, args.out, args.seed, args.std, args.rank)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
