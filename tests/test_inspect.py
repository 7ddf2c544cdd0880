"""streammerge inspect: models and adapters described from headers and configs; fit with a base."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.helpers import run_cli
from tests.test_hub import add_to_cache
from tools.synthetic import PRESETS, write_adapter, write_model


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("inspect")
    base = write_model(root / "base", PRESETS["tiny"], "BF16", seed=0, max_shard_size=100_000)
    qwen = write_model(root / "qwen", PRESETS["tiny-qwen2"], "BF16", seed=0)
    return {"root": root, "base": base, "qwen": qwen,
            "lora": write_adapter(base, root / "lora", rank=8, alpha=4, seed=1, targets=("q_proj", "v_proj")),
            "foreign": write_adapter(qwen, root / "foreign", rank=4, seed=2)}


def test_model(world):
    report = json.loads(run_cli("inspect", str(world["base"]), "--json").stdout)
    assert report["kind"] == "model" and report["architecture"] == "LlamaForCausalLM"
    assert report["num_layers"] == 2 and report["sharded"] is True
    assert report["tensors"]["count"] == 21 and report["tensors"]["dtypes"] == {"BF16": 21}
    assert report["tensors"]["bytes"] == sum(
        os.path.getsize(p) for p in world["base"].glob("*.safetensors")) - sum(
        8 + int.from_bytes(p.read_bytes()[:8], "little") for p in world["base"].glob("*.safetensors"))
    text = run_cli("inspect", str(world["base"])).stdout
    assert "LlamaForCausalLM (llama), 2 layers, hidden 64, vocab 512" in text and "BF16 x21" in text


def test_adapter_with_compatible_base(world):
    proc = run_cli("inspect", str(world["lora"]), "--base", str(world["base"]))
    assert proc.returncode == 0
    assert "LoRA: r=8 alpha=4" in proc.stdout
    assert "4 modules; targets ['q_proj', 'v_proj']; ranks {'8': 4}; scalings {'0.5': 4}" in proc.stdout
    assert "made for LlamaForCausalLM" in proc.stdout
    assert f"fits base {world['base']}: changes 4 of 21 tensors" in proc.stdout


def test_adapter_for_another_model(world):
    proc = run_cli("inspect", str(world["foreign"]), "--base", str(world["base"]), "--json", check=False)
    assert proc.returncode == 2
    report = json.loads(proc.stdout)
    assert report["compatible"] is False
    assert any("was made for a Qwen2ForCausalLM model but the base is a LlamaForCausalLM" in p
               for p in report["problems"])


def test_unsupported_adapter_is_named(world, tmp_path):
    dora = tmp_path / "dora"
    dora.mkdir()
    config = json.loads((world["lora"] / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    (dora / "adapter_model.safetensors").write_bytes((world["lora"] / "adapter_model.safetensors").read_bytes())
    proc = run_cli("inspect", str(dora))
    assert "not mergeable" in proc.stdout and "use_dora=True is not supported" in proc.stdout


def test_hub_repo_id(world, tmp_path):
    cache = tmp_path / "hub"
    add_to_cache(cache, "org/lora", world["lora"], "c0ffee00" * 5)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache))
    proc = run_cli("inspect", "org/lora", env=env)
    assert "org/lora: adapter (Hub commit c0ffee00c0ffee00" in proc.stdout


def test_help_has_examples():
    for command in ("merge", "plan", "inspect"):
        text = run_cli(command, "--help").stdout
        assert "examples:" in text and f"streammerge {command}" in text
