"""Builders for tests: tiny real transformers models and real PEFT adapters, and oracles."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from streammerge.io.reader import CheckpointReader, open_checkpoint

REPO = Path(__file__).resolve().parent.parent


def tiny_llama_config(tied: bool = False, vocab: int = 128):
    from transformers import LlamaConfig
    return LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=vocab, tie_word_embeddings=tied,
                       max_position_embeddings=64)


def save_tiny_llama(out: Path, dtype: torch.dtype = torch.float32, tied: bool = False, seed: int = 0,
                    shard_size: str = "60KB") -> Path:
    """A real transformers LlamaForCausalLM with random weights, saved sharded."""
    from transformers import LlamaForCausalLM
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(tied)).to(dtype)
    model.save_pretrained(out, max_shard_size=shard_size)
    return out


def save_tiny_gpt2(out: Path, seed: int = 0) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64))
    model.save_pretrained(out)
    return out


def load_causal_lm(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)


def save_peft_adapter(base: Path, out: Path, dtype: torch.dtype, seed: int, **lora_kwargs) -> Path:
    """A real PEFT adapter made with get_peft_model, with every factor randomised (B non-zero)."""
    from peft import LoraConfig, get_peft_model
    model = load_causal_lm(base, dtype)
    peft_model = get_peft_model(model, LoraConfig(**lora_kwargs))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    peft_model.save_pretrained(out)
    return out


def peft_merged_state(base: Path, adapter: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The reference: PEFT's own merge_and_unload of one adapter."""
    from peft import PeftModel
    model = PeftModel.from_pretrained(load_causal_lm(base, dtype), adapter)
    merged = model.merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def read_model(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model directory (test-sized)."""
    layout = open_checkpoint(path)
    with CheckpointReader(layout) as reader:
        return {name: reader.read(name) for name in layout.tensor_names}


def read_raw(path: Path) -> dict[str, bytes]:
    layout = open_checkpoint(path)
    raw: dict[str, bytes] = {}

    def sink(name: str, part: memoryview) -> None:
        raw[name] = raw.get(name, b"") + bytes(part)

    with CheckpointReader(layout) as reader:
        for name in layout.tensor_names:
            raw[name] = b""
            for start, stop in reader.byte_ranges(name):
                reader.copy_range(name, start, stop, sink)
    return raw


def load_adapter_file(adapter: Path) -> dict[str, torch.Tensor]:
    return load_file(str(adapter / "adapter_model.safetensors"))


def adapter_config(adapter: Path) -> dict:
    return json.loads((adapter / "adapter_config.json").read_text())


def bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """One bf16 unit in the last place at each value of ``x`` (8 significant bits)."""
    mag = x.float().abs().clamp_min(torch.finfo(torch.bfloat16).tiny)
    return torch.exp2(torch.floor(torch.log2(mag)) - 7)


def assert_close_to_reference(ours: torch.Tensor, ref: torch.Tensor, name: str,
                              base: torch.Tensor | None = None) -> None:
    """fp32: 1e-6; bf16: one ulp at the magnitude of the values involved.

    The reference (PEFT) rounds the delta to bf16 before adding it to the base, so where the
    sum cancels, the error is an ulp of the operands, not of the (tiny) result; ``base`` gives
    that operand magnitude.
    """
    assert ours.dtype == ref.dtype, f"{name}: dtype {ours.dtype} != {ref.dtype}"
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    if ours.dtype == torch.bfloat16:
        diff = (ours.float() - ref.float()).abs()
        magnitude = torch.maximum(ours.float().abs(), ref.float().abs())
        if base is not None:
            magnitude = torch.maximum(magnitude, base.float().abs())
        bound = bf16_ulp(magnitude) * 1.0001
        assert bool((diff <= bound).all()), f"{name}: max diff {diff.max():.3g} exceeds one bf16 ulp"
    else:
        torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6, msg=lambda m: f"{name}: {m}")


def run_cli(*args: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m streammerge`` in a subprocess, as a user would."""
    proc = subprocess.run([sys.executable, "-m", "streammerge", *args], capture_output=True, text=True,
                          cwd=REPO, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"streammerge {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def random_lora(d_out: int, d_in: int, r: int, seed: int, scale: float = 1.0):
    """A seeded random LoRA update (B scaled by ``scale``) for method tests."""
    from streammerge.methods import LowRankUpdate
    g = torch.Generator().manual_seed(seed)
    return LowRankUpdate(up=torch.randn(d_out, r, generator=g) * scale, down=torch.randn(r, d_in, generator=g))
