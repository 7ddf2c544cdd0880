"""Adapters saved from a task model merge into the bare backbone they were built on, and back.

Oracle: an independent ``W0 + s·B·A`` computed from the saved factors and the adapter config,
on tiny real BERT / RoBERTa / Llama models built with transformers and adapters made by PEFT.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from streammerge import InputSpec, Recipe, merge
from streammerge.errors import PlanError
from streammerge.inputs.keymap import IDENTITY, KeyMapping, find_key_mapping
from tests.helpers import load_adapter_file, read_model, tiny_llama_config

PEFT_PREFIX = "base_model.model."


def _encoder(kind: str, head: bool, seed: int):
    import transformers
    torch.manual_seed(seed)
    config_cls = getattr(transformers, f"{kind}Config")
    config = config_cls(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=40, num_labels=3)
    model_cls = getattr(transformers, f"{kind}ForSequenceClassification" if head else f"{kind}Model")
    return model_cls(config)


def _task_adapter(kind: str, root: Path) -> tuple[Path, Path]:
    """A PEFT LoRA on ``<kind>ForSequenceClassification`` and that model's bare backbone, saved."""
    from peft import LoraConfig, get_peft_model
    task_model = _encoder(kind, head=True, seed=0)
    backbone = getattr(task_model, kind.lower())
    base = root / f"{kind}-backbone"
    backbone.save_pretrained(base, safe_serialization=True)
    peft_model = get_peft_model(task_model, LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                                       task_type="SEQ_CLS"))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(hash(name) % 2**31))
    adapter = root / f"{kind}-adapter"
    peft_model.save_pretrained(adapter, safe_serialization=True)
    return base, adapter


def _expected(base: Path, adapter: Path, strip: str, add: str) -> dict[str, torch.Tensor]:
    """W0 + s·B·A per adapted module, from the adapter's own files."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    factors = load_adapter_file(adapter)
    weights = read_model(base)
    expected = {}
    for key, a in factors.items():
        if ".lora_A." not in key:
            continue
        module = key.removeprefix(PEFT_PREFIX).split(".lora_A.")[0]
        name = add + module.removeprefix(strip) + ".weight"
        b = factors[key.replace("lora_A", "lora_B")]
        expected[name] = weights[name] + scale * b.float() @ a.float()
    assert expected
    return expected


@pytest.mark.parametrize("kind", ["Bert", "Roberta"])
def test_task_model_adapter_merges_into_bare_backbone(kind, tmp_path):
    base, adapter = _task_adapter(kind, tmp_path)
    recipe = Recipe(base=str(base), inputs=(InputSpec(str(adapter)),), device="cpu", dtype="float32")
    with pytest.raises(PlanError, match="classifier.*which the base model does not have.*--skip-missing"):
        merge(recipe, str(tmp_path / "refused"))
    out = tmp_path / "out"
    from dataclasses import replace
    merge(replace(recipe, skip_missing=True), str(out))
    merged, original = read_model(out), read_model(base)
    expected = _expected(base, adapter, strip=f"{kind.lower()}.", add="")
    for name, tensor in merged.items():
        torch.testing.assert_close(tensor, expected.get(name, original[name]), rtol=1e-6, atol=1e-6)
    card = (out / "README.md").read_text()
    assert f"prefix '{kind.lower()}.' removed" in card and "left out (no base tensor)" in card


def test_bare_llama_adapter_merges_into_causal_lm(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM, LlamaModel
    torch.manual_seed(0)
    causal = LlamaForCausalLM(tiny_llama_config())
    base = tmp_path / "causal"
    causal.save_pretrained(base, safe_serialization=True)
    bare = LlamaModel(tiny_llama_config())
    bare.load_state_dict(causal.model.state_dict())
    peft_model = get_peft_model(bare, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    adapter = tmp_path / "bare-adapter"
    peft_model.save_pretrained(adapter, safe_serialization=True)
    out = tmp_path / "out"
    merge(Recipe(base=str(base), inputs=(InputSpec(str(adapter)),), device="cpu"), str(out))
    merged, original = read_model(out), read_model(base)
    expected = _expected(base, adapter, strip="", add="model.")
    for name, tensor in merged.items():
        torch.testing.assert_close(tensor, expected.get(name, original[name]), rtol=1e-6, atol=1e-6)


def test_mapping_search():
    base = {"encoder.layer.0.q.weight", "encoder.layer.1.q.weight", "embeddings.word.weight"}
    assert find_key_mapping(["encoder.layer.0.q.weight"], [], base) == (IDENTITY, [])
    mapping, _ = find_key_mapping(["bert.encoder.layer.0.q.weight", "bert.encoder.layer.1.q.weight"], [], base)
    assert mapping == KeyMapping(strip="bert.") and mapping.apply("classifier.weight") == "classifier.weight"
    mapping, _ = find_key_mapping(["layers.0.q.weight"], [], {"model.layers.0.q.weight"})
    assert mapping == KeyMapping(add="model.")
    # nothing fits: the identity, and the caller names every module the base lacks
    assert find_key_mapping(["x.y.weight"], [], base) == (IDENTITY, [])


def test_two_mappings_that_disagree_are_refused():
    base = {"a.m.weight", "b.m.weight"}
    mapping, candidates = find_key_mapping(["m.weight"], [], base)
    assert mapping is None and {c.add for c in candidates} == {"a.", "b."}
