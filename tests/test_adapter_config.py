"""adapter_config.json: scaling rules as PEFT computes them, and refusals by name."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from streammerge.inputs.peft_config import parse_lora_settings
from streammerge.errors import UnsupportedAdapterError

BASE = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]}


def settings(**over):
    return parse_lora_settings(Path("/adapters/x"), {**BASE, **over})


def test_plain_and_rslora_scaling():
    assert settings().scaling("model.layers.0.self_attn.q_proj") == 2.0
    assert settings(use_rslora=True).scaling("model.layers.0.self_attn.q_proj") == 16 / math.sqrt(8)


def test_rank_and_alpha_patterns_match_dotted_suffixes_like_peft():
    s = settings(rank_pattern={"layers.1.self_attn.q_proj": 2, "up_proj": 4}, alpha_pattern={"o_proj": 3})
    assert s.rank_and_alpha("model.layers.1.self_attn.q_proj") == (2, 16)
    assert s.rank_and_alpha("model.layers.11.self_attn.q_proj") == (8, 16)  # suffix match, not substring
    assert s.rank_and_alpha("model.layers.0.mlp.up_proj") == (4, 16)
    assert s.scaling("model.layers.0.self_attn.o_proj") == 3 / 8


@pytest.mark.parametrize("field,value,reason", [
    ("peft_type", "IA3", "only LoRA adapters can be merged"),
    ("use_dora", True, "DoRA adapters carry a magnitude vector"),
    ("layer_replication", [[0, 2]], "layer replication"),
    ("init_lora_weights", "pissa", "rewrites the base weights"),
    ("init_lora_weights", "olora", "rewrites the base weights"),
    ("init_lora_weights", "corda", "rewrites the base weights"),
    ("target_parameters", ["experts.gate_up_proj"], "raw nn.Parameters"),
    ("bias", "all", "train the base biases"),
])
def test_unsupported_features_are_refused_by_name(field, value, reason):
    with pytest.raises(UnsupportedAdapterError) as info:
        settings(**{field: value})
    message = str(info.value)
    assert message.startswith(f"adapter '/adapters/x': {field}={value!r} is not supported")
    assert reason in message
