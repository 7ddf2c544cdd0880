"""Chat templates of model directories, and the one a recipe's ``chat_template`` asks for.

A template lives in ``chat_template.jinja`` (transformers >= 4.50 saves it there) or under
``chat_template`` in ``tokenizer_config.json`` (a string, or a list of ``{name, template}``
whose ``default`` entry is the template, as transformers reads it).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import InputError, StreamMergeError
from ..names import CHAT_TEMPLATE_KEY, CHAT_TEMPLATE_NAME, TOKENIZER_CONFIG_NAME

if TYPE_CHECKING:
    from ..recipe import Recipe
    from .hub import Source

__all__ = ["AUTO", "BASE", "read_chat_template", "resolve_chat_template", "recipe_chat_template"]

AUTO = "auto"
"""The most common template of the base and the inputs (mergekit's ``chat_template: auto``)."""
BASE = "base"
"""The base's template, unchanged."""


def read_chat_template(model_dir: str | Path) -> str | None:
    """The chat template of the model directory ``model_dir`` (None when it has none).

    Raises:
        InputError: ``tokenizer_config.json`` is not valid JSON.
    """
    root = Path(model_dir)
    root = root.parent if root.is_file() else root
    jinja = root / CHAT_TEMPLATE_NAME
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    config = root / TOKENIZER_CONFIG_NAME
    if not config.is_file():
        return None
    try:
        template = json.loads(config.read_text(encoding="utf-8")).get(CHAT_TEMPLATE_KEY)
    except (json.JSONDecodeError, AttributeError) as e:
        raise InputError(f"{str(config)!r} is not a JSON object: {e}") from e
    if isinstance(template, list):
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)
    return template if isinstance(template, str) and template else None


def resolve_chat_template(setting: str, model_dirs: Sequence[str]) -> str | None:
    """The template text ``setting`` writes (None: the base's files stay as they are).

    ``auto`` takes the most common stripped template among ``model_dirs``, one directory per distinct
    model reference, the base first (an adapter's is its base's, as mergekit reads the tokenizer of
    ``model`` in ``model+lora``); a tie goes to the one listed first, where mergekit's order is a set's.
    Nothing is written when none has a template.  ``base`` keeps the base's; anything else is the text.
    """
    if setting == BASE:
        return None
    if setting != AUTO:
        return setting
    templates = [t.strip() for t in map(read_chat_template, model_dirs) if t]
    return Counter(templates).most_common(1)[0][0] if templates else None


def recipe_chat_template(recipe: Recipe, sources: Sequence[Source], problems: list[str]) -> str | None:
    """The template text ``recipe.chat_template`` writes, given the base's and the inputs' local ``sources``
    (``auto``: one directory per distinct reference, an adapter's being its base's); problems are appended."""
    if recipe.chat_template is None:
        return None
    base_dir = sources[0].local_path
    dirs = {("model", recipe.base, recipe.revision): base_dir}
    for spec, source in zip(recipe.inputs, sources[1:]):
        dirs.setdefault((spec.kind, spec.path, spec.revision), base_dir if spec.kind == "adapter" else source.local_path)
    try:
        template = resolve_chat_template(recipe.chat_template, list(dirs.values()))
    except StreamMergeError as e:
        problems.append(f"chat_template: {e}")
        return None
    base_root = Path(base_dir).parent if Path(base_dir).is_file() else Path(base_dir)
    if template is not None and not (base_root / TOKENIZER_CONFIG_NAME).is_file():
        problems.append(f"chat_template: the base {base_dir!r} has no {TOKENIZER_CONFIG_NAME} to write the template "
                        "into; add the base's tokenizer files, or leave chat_template out")
    return template
