"""Unlabelled task data for OSRM: read examples, tokenize, batch with right padding.

A task file is either plain text (one example per non-empty line) or JSON lines
(``.jsonl`` / ``.json``): each line an object with a text field (``"text"`` unless told
otherwise) or pre-tokenized ``"input_ids"``.  Pre-tokenized lines work without a tokenizer.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError

__all__ = ["JSONL_SUFFIXES", "read_examples", "needs_tokenizer", "padded_batches"]

JSONL_SUFFIXES = (".jsonl", ".json")


def _records(path: Path, text_field: str) -> Iterator[tuple[int, str | list[int]]]:
    """(line number, text or token ids) for every non-empty line."""
    jsonl = path.suffix.lower() in JSONL_SUFFIXES
    try:
        handle = open(path, encoding="utf-8")
    except OSError as e:
        raise InputError(f"cannot read task data {str(path)!r}: {e.strerror or e}") from e
    with handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            if not jsonl:
                yield number, line.rstrip("\n")
                continue
            yield number, _parse_json_line(path, number, line, text_field)


def _parse_json_line(path: Path, number: int, line: str, text_field: str) -> str | list[int]:
    where = f"task data {str(path)!r} line {number}"
    try:
        doc: Any = json.loads(line)
    except json.JSONDecodeError as e:
        raise InputError(f"{where} is not valid JSON ({e.msg}); JSONL files need one JSON object per line") from e
    if not isinstance(doc, dict):
        raise InputError(f"{where} must be a JSON object with {text_field!r} or 'input_ids'")
    if "input_ids" in doc:
        ids = doc["input_ids"]
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                                for i in ids):
            raise InputError(f"{where}: 'input_ids' must be a list of non-negative integers")
        return ids
    text = doc.get(text_field)
    if not isinstance(text, str):
        raise InputError(f"{where} has no string field {text_field!r} and no 'input_ids'; "
                         f"fields present: {sorted(doc)} (choose the text field with --text-field)")
    return text


def needs_tokenizer(path: Path, text_field: str = "text", max_examples: int | None = None) -> bool:
    """Whether any of the examples read from ``path`` is text (as opposed to token ids)."""
    for i, (_number, record) in enumerate(_records(Path(path), text_field)):
        if max_examples is not None and i >= max_examples:
            break
        if isinstance(record, str):
            return True
    return False


def read_examples(path: Path, tokenizer: Any | None, max_examples: int, max_length: int,
                  text_field: str = "text", vocab_size: int | None = None) -> list[list[int]]:
    """The first ``max_examples`` examples of a task file as token-id lists (truncated).

    Raises:
        InputError: unreadable file, bad JSON line, text without a tokenizer, ids out of the
            vocabulary, or no examples at all.
    """
    path = Path(path)
    examples: list[list[int]] = []
    for number, record in _records(path, text_field):
        if len(examples) >= max_examples:
            break
        if isinstance(record, str):
            if tokenizer is None:
                raise InputError(
                    f"task data {str(path)!r} line {number} is text, but the base model directory has no tokenizer; "
                    "add the tokenizer files to it, or give pre-tokenized JSONL lines like {\"input_ids\": [1, 2, 3]}")
            ids = list(tokenizer(record, truncation=True, max_length=max_length)["input_ids"])
        else:
            ids = record[:max_length]
        if vocab_size is not None and ids and max(ids) >= vocab_size:
            raise InputError(f"task data {str(path)!r} line {number} has token id {max(ids)}, "
                             f"outside the model's vocabulary of {vocab_size}")
        if ids:
            examples.append(ids)
    if not examples:
        raise InputError(f"task data {str(path)!r} holds no examples (every line is empty)")
    return examples


def padded_batches(examples: Sequence[Sequence[int]], batch_size: int,
                   pad_id: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(input_ids, attention_mask)`` batches, right-padded; examples sorted by length.

    Right padding keeps every real token at the position it has unpadded, so a causal model
    computes the same features for it; the mask marks the padding for the statistics hooks.
    Sorting by length keeps padding (wasted compute) small; sums do not depend on order.
    """
    if batch_size <= 0:
        raise InputError(f"the batch size must be positive; got {batch_size}")
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i]), i))
    for start in range(0, len(order), batch_size):
        chunk = [examples[i] for i in order[start:start + batch_size]]
        width = max(len(ids) for ids in chunk)
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, ids in enumerate(chunk):
            input_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            mask[row, :len(ids)] = 1
        yield input_ids, mask
