"""Base model formats as data: a safetensors checkpoint or a GGUF file, behind one layout and one reader.

The planner, the worker and the sinks look the base's format up here (``MergePlan.base_format``
is a key of ``BASE_FORMATS``) instead of testing file names: each entry says how to open the
layout (tensor names, shapes, stored dtypes, byte ranges), which reader streams its rows as
float32, which ``config.json`` it stands for, which dtype an HF output stores a tensor in, and
which files an HF output carries besides the weights.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..io.dtypes import FLOAT_DTYPE_NAMES
from ..io.reader import CheckpointLayout, CheckpointReader, open_checkpoint
from ..names import CONFIG_NAME
from .gguf_checkpoint import GGUFCheckpoint, GGUFCheckpointReader, find_gguf, ggml_type_of, open_gguf_checkpoint
from .gguf_config import gguf_hf_config, tokenizer_available, tokenizer_files

__all__ = ["BaseFormat", "BASE_FORMATS", "SAFETENSORS", "GGUF", "base_format_of", "open_reader", "read_config"]


@dataclass(frozen=True)
class BaseFormat:
    """One format a base model can come in.

    Attributes:
        name: the key stored in plans.
        open: path → layout (headers only, no tensor data).
        reader: the reader class over that layout (``read_rows`` in float32 where the format is not plain).
        config: layout → the HF ``config.json`` content (``{}`` when there is none).
        output_dtype: (stored dtype, --dtype or None) → the dtype an HF output writes the tensor in.
        keeps_file_layout: an HF output may keep the base's shard files and index.
        generated_files: layout → ``{file name: producer of its bytes}`` an HF output writes besides the
            weights (None: the base directory's config and tokenizer files are copied as they are).
        missing_files: what an HF output of this base lacks that a model directory normally has ('' none).
        output_formats: the ``--output-format`` values a merge onto this base can write (None: every one).
        exact_values: the stored values are the weights themselves, not a quantization of them (a full
            fine-tune's task vector ``value − W0`` is then meaningful).
        related_architectures: HF classes the base's ``architectures[0]`` also stands for (adapters made
            for them fit): llama.cpp stores Mistral as ``llama``, so a GGUF cannot tell them apart.
    """

    name: str
    open: Callable[[Path], CheckpointLayout]
    reader: type[CheckpointReader]
    config: Callable[[CheckpointLayout], dict[str, Any]]
    output_dtype: Callable[[str, str | None], str]
    keeps_file_layout: bool = True
    generated_files: Callable[[CheckpointLayout], dict[str, Callable[[], bytes]]] | None = None
    missing_files: Callable[[], str] = lambda: ""
    output_formats: frozenset[str] | None = None
    exact_values: bool = True
    related_architectures: dict[str, tuple[str, ...]] = field(default_factory=dict)


def read_config(root: Path) -> dict[str, Any]:
    """A model directory's ``config.json`` (``{}`` when it has none)."""
    path = root / CONFIG_NAME
    if not path.is_file():
        return {}
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise InputError(f"cannot read {str(path)!r}: {str(e)[:300]}") from e
    if not isinstance(doc, dict):
        raise InputError(f"{str(path)!r} must hold a JSON object, found {type(doc).__name__}")
    architectures = doc.get("architectures")
    if architectures is not None and not (
            isinstance(architectures, list) and all(isinstance(a, str) for a in architectures)):
        raise InputError(f"{str(path)!r}: \"architectures\" must be a list of class names, "
                         f"found {architectures!r:.200}")
    return doc


def _safetensors_dtype(stored: str, wanted: str | None) -> str:
    return wanted if wanted and stored in FLOAT_DTYPE_NAMES else stored


# A quantized GGUF tensor is written as F16 unless --dtype says otherwise: F16's 11-bit mantissa keeps
# the dequantized values (an f16 scale times a small integer) far closer than the quantization error.
GGUF_QUANTIZED_OUTPUT = "F16"


def _gguf_dtype(stored: str, wanted: str | None) -> str:
    ggml = ggml_type_of(stored) or stored
    return wanted or (ggml if ggml in ("F32", "F16", "BF16") else GGUF_QUANTIZED_OUTPUT)


def _gguf_files(layout: CheckpointLayout) -> dict[str, Callable[[], bytes]]:
    assert isinstance(layout, GGUFCheckpoint)
    config = gguf_hf_config(layout)
    files: dict[str, Callable[[], bytes]] = {CONFIG_NAME: lambda: (json.dumps(config, indent=2) + "\n").encode()}
    if tokenizer_available():
        cached: dict[str, bytes] = {}

        def tokenizer_file(name: str) -> bytes:
            if not cached:
                cached.update(tokenizer_files(layout.shards[0]))
            return cached[name]
        files.update({name: partial(tokenizer_file, name) for name in ("tokenizer.json", "tokenizer_config.json")})
    return files


def _gguf_missing() -> str:
    if tokenizer_available():
        return "generation_config.json (sampling defaults are not stored in a GGUF)"
    return ("the tokenizer (tokenizer.json, tokenizer_config.json: rebuilding it from the GGUF needs transformers) "
            "and generation_config.json")


SAFETENSORS = BaseFormat("safetensors", open_checkpoint, CheckpointReader, lambda layout: read_config(layout.root),
                         _safetensors_dtype)
GGUF = BaseFormat("gguf", open_gguf_checkpoint, GGUFCheckpointReader,
                  lambda layout: gguf_hf_config(layout, strict=False),  # type: ignore[arg-type]
                  _gguf_dtype, keeps_file_layout=False, generated_files=_gguf_files, missing_files=_gguf_missing,
                  output_formats=frozenset({"model", "gguf"}), exact_values=False,
                  related_architectures={"LlamaForCausalLM": ("MistralForCausalLM",)})
BASE_FORMATS: dict[str, BaseFormat] = {f.name: f for f in (SAFETENSORS, GGUF)}


def base_format_of(path: str | Path) -> BaseFormat:
    """The format of the model at ``path``: GGUF for a ``.gguf`` file or a directory whose only weights are GGUF."""
    path = Path(path)
    if path.is_dir() and any(path.glob("*.safetensors")):
        return SAFETENSORS
    return GGUF if find_gguf(path) is not None else SAFETENSORS


def open_reader(path: str | Path) -> CheckpointReader:
    """A reader over the model file or directory at ``path``, in its format."""
    fmt = base_format_of(path)
    return fmt.reader(fmt.open(Path(path)))
