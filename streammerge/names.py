"""On-disk names, patterns and keys, each written exactly once."""

from __future__ import annotations

SAFETENSORS_SUFFIX = ".safetensors"
SINGLE_FILE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
SHARD_NAME_TEMPLATE = "model-{index:05d}-of-{count:05d}.safetensors"
PARTIAL_SUFFIX = ".partial"

CONFIG_NAME = "config.json"
MODEL_CARD_NAME = "README.md"
RECIPE_NAME = "streammerge_recipe.json"

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_PICKLE_NAME = "adapter_model.bin"

PICKLE_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")

# The block index inside a tensor name: model.layers.N. (Llama, Qwen, Mistral), transformer.h.N. (GPT-2),
# blocks.N. / layer.N. (others). Per-layer recipe weights are interpolated over it.
LAYER_INDEX_PATTERN = r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\."
# config.json keys that give the number of layers, in order of preference.
NUM_LAYERS_KEYS = ("num_hidden_layers", "n_layer", "num_layers")

METADATA_KEY = "__metadata__"
DEFAULT_METADATA = {"format": "pt"}

# Files a model directory carries besides its weights; copied to the output as they are.
WEIGHT_FILE_SUFFIXES = (SAFETENSORS_SUFFIX, *PICKLE_WEIGHT_SUFFIXES)
NOT_COPIED_NAMES = frozenset({INDEX_NAME, "pytorch_model.bin.index.json", MODEL_CARD_NAME, RECIPE_NAME})
