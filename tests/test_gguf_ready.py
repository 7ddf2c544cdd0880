"""The output is what llama.cpp's convert_hf_to_gguf.py reads: config.json with architectures,
safetensors with HF tensor names (+ index), tokenizer files.  Checked with the ``gguf`` package
(the library the converter is built on): every tensor name maps through gguf's own HF → GGUF
name table, and a GGUF file written from our output with gguf's writer reads back equal.
llama.cpp's converter script itself is not on PyPI, so it is not run here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from streammerge import InputSpec, Recipe, merge
from tests.helpers import read_model, save_peft_adapter, save_tiny_llama

gguf = pytest.importorskip("gguf")


def _save_tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {f"t{i}": i for i in range(126)} | {"<s>": 126, "</s>": 127}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>").save_pretrained(out)


def test_output_converts_to_gguf(tmp_path):
    base = save_tiny_llama(tmp_path / "base", torch.float32)
    _save_tokenizer(base)
    adapter = save_peft_adapter(base, tmp_path / "lora", torch.float32, seed=1, r=4, lora_alpha=8,
                                target_modules=["q_proj", "down_proj"])
    out = tmp_path / "merged"
    merge(Recipe(base=str(base), inputs=(InputSpec(str(adapter)),), device="cpu"), str(out))

    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(read_model(out))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (base / name).read_bytes()
    from transformers import AutoTokenizer
    assert AutoTokenizer.from_pretrained(out).convert_tokens_to_ids("t5") == 5

    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == config["model_type"])
    names = gguf.get_tensor_name_map(arch, config["num_hidden_layers"])
    tensors = read_model(out)
    mapped = {name: names.get_name(name, try_suffixes=(".weight", ".bias")) for name in tensors}
    assert None not in mapped.values(), [n for n, m in mapped.items() if m is None]
    assert mapped["model.layers.1.self_attn.q_proj.weight"] == "blk.1.attn_q.weight"

    path = tmp_path / "merged.gguf"
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_head_count(config["num_attention_heads"])
    for name, tensor in tensors.items():
        writer.add_tensor(mapped[name], tensor.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    reader = gguf.GGUFReader(str(path))
    back = {t.name: t for t in reader.tensors}
    assert set(back) == set(mapped.values())
    for name, tensor in tensors.items():
        np.testing.assert_array_equal(np.asarray(back[mapped[name]].data).reshape(tensor.shape), tensor.numpy())
