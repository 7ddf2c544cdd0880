"""On-disk names, patterns and keys, each written exactly once."""

from __future__ import annotations

SAFETENSORS_SUFFIX = ".safetensors"
SINGLE_FILE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
SHARD_NAME_TEMPLATE = "model-{index:05d}-of-{count:05d}.safetensors"
PARTIAL_SUFFIX = ".partial"

CONFIG_NAME = "config.json"
TOKENIZER_CONFIG_NAME = "tokenizer_config.json"
CHAT_TEMPLATE_NAME = "chat_template.jinja"  # transformers >= 4.50 saves the template here
CHAT_TEMPLATE_KEY = "chat_template"
MODEL_CARD_NAME = "README.md"
RECIPE_NAME = "streammerge_recipe.json"
JOURNAL_NAME = "streammerge_journal.jsonl"
# A distributed job's rank r > 0 journals its units here; rank 0 folds them into JOURNAL_NAME (jobs/journal.py).
RANK_JOURNAL_TEMPLATE = "streammerge_journal.rank-{rank}.jsonl"
RANK_JOURNAL_PATTERN = r"streammerge_journal\.rank-(\d+)\.jsonl"

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_PICKLE_NAME = "adapter_model.bin"

PICKLE_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")

# Scratch parts of a merged adapter (--output-format adapter): one per output unit, consumed at the end.
ADAPTER_PART_TEMPLATE = "adapter_model.part-{index:05d}-of-{count:05d}.safetensors"
SPOOL_SUFFIX = ".spool"

# Token-embedding tensors (a tied lm_head reads one of them), and every embedding (embedding LoRA).
TOKEN_EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight")
EMBEDDING_SUFFIXES = (*TOKEN_EMBEDDING_SUFFIXES, "wpe.weight", "embed_positions.weight")

# The block index inside a tensor name: model.layers.N. (Llama, Qwen, Mistral), transformer.h.N. (GPT-2),
# blocks.N. / layer.N. (others). Per-layer recipe weights are interpolated over it.
LAYER_INDEX_PATTERN = r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\."
# config.json keys that give the number of layers, in order of preference.
NUM_LAYERS_KEYS = ("num_hidden_layers", "n_layer", "num_layers")

METADATA_KEY = "__metadata__"
DEFAULT_METADATA = {"format": "pt"}

# Files a model directory carries besides its weights; copied to the output as they are.
WEIGHT_FILE_SUFFIXES = (SAFETENSORS_SUFFIX, *PICKLE_WEIGHT_SUFFIXES)
NOT_COPIED_NAMES = frozenset({INDEX_NAME, "pytorch_model.bin.index.json", MODEL_CARD_NAME, RECIPE_NAME, JOURNAL_NAME})

# The job journal (journal.py): one JSON object per line; every record has JOURNAL_RECORD_KEY.
JOURNAL_FORMAT = 2
JOURNAL_RECORD_KEY = "record"
JOURNAL_JOB = "job"  # first line: what the job is (recipe, input fingerprints, output units)
JOURNAL_UNIT = "unit"  # one per finished output unit (a shard, an adapter part)
JOURNAL_COMPLETE = "complete"  # last line: index, configs and model card are written too
JOURNAL_STATISTICS = "statistics"  # whole-model first-pass result (TIES scope: global), before any unit
JOURNAL_THRESHOLDS_KEY = "thresholds"
JOURNAL_FORMAT_KEY = "format"
JOURNAL_VERSION_KEY = "streammerge"
JOURNAL_RECIPE_KEY = "recipe"
JOURNAL_RECIPE_FINGERPRINT_KEY = "recipe_fingerprint"
JOURNAL_PLAN_FINGERPRINT_KEY = "plan_fingerprint"
JOURNAL_JOB_DIGEST_KEY = "job_digest"
JOURNAL_BASE_KEY = "base"
JOURNAL_INPUTS_KEY = "inputs"
JOURNAL_UNITS_KEY = "units"
JOURNAL_OUTPUT_FORMAT_KEY = "output_format"
JOURNAL_FILES_KEY = "files"
JOURNAL_PATH_KEY = "path"
JOURNAL_FINGERPRINT_KEY = "fingerprint"
JOURNAL_CONTENT_KEY = "content_sha256"
JOURNAL_FILE_KEY = "file"
JOURNAL_SIZE_KEY = "size"
JOURNAL_SHA256_KEY = "sha256"
JOURNAL_MERGED_KEY = "tensors_merged"
JOURNAL_COPIED_KEY = "tensors_copied"
JOURNAL_STATS_KEY = "stats"
JOURNAL_EXTRA_KEY = "extra"

# Converted pickle adapters (--allow-pickle) are cached here, by content hash.
CACHE_DIR_ENV = "STREAMMERGE_CACHE_DIR"
PICKLE_CACHE_SUBDIR = "from-pickle"
