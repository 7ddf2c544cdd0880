"""Hugging Face Hub repo ids as merge inputs: resolve each to a local snapshot before planning.

A reference that exists on disk is always a local path.  Anything else that is a valid repo
id (``org/name`` or ``name``) is fetched with ``huggingface_hub.snapshot_download``: only
top-level weights (safetensors), JSON configs and tokenizer files, at the requested revision,
through the usual cache (``HF_HUB_CACHE`` / ``HF_HOME``), token (``HF_TOKEN`` or
``hf auth login``) and offline switch (``HF_HUB_OFFLINE=1``: the cache only).  Each failure
becomes a ``HubError`` that says what to do.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import HubError, StreamMergeError

if TYPE_CHECKING:
    from ..recipe import Recipe

__all__ = ["ALLOW_PATTERNS", "IGNORE_PATTERNS", "Source", "is_repo_id", "resolve_source", "resolve_recipe_sources"]

ALLOW_PATTERNS = ("*.safetensors", "*.json", "tokenizer*", "*.model", "*.tiktoken", "*.txt", "*.jinja")
"""Weights, configs (model, adapter, generation, index) and tokenizer files; never pickles or code."""
IGNORE_PATTERNS = ("*/*",)
"""Sub-folders (e.g. Meta's ``original/`` consolidated checkpoints) are never read, so never fetched."""


@dataclass(frozen=True)
class Source:
    """Where one reference (base or input) was found.

    Attributes:
        reference: the path or repo id as the recipe gives it.
        local_path: the local directory (or file) that is read.
        repo_id: the Hub repo id, or None for a local path.
        commit: the resolved commit SHA of a Hub snapshot (pins the recipe), else None.
    """

    reference: str
    local_path: str
    repo_id: str | None = None
    commit: str | None = None


def is_repo_id(reference: str) -> bool:
    """Whether ``reference`` is spelled like a Hub repo id (``org/name`` or ``name``)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not reference or reference.startswith((".", "/", "~")):
        return False
    try:
        validate_repo_id(reference)
    except HFValidationError:
        return False
    return True


def resolve_source(reference: str, revision: str | None = None) -> Source:
    """The local files of ``reference``: the path itself when it exists, else a Hub snapshot.

    Raises:
        HubError: the repo cannot be resolved; the message says why and how to fix it.
    """
    if Path(reference).expanduser().exists() or not is_repo_id(reference):
        # A missing local path is reported by the planner, which names what it expected there.
        return Source(reference, str(Path(reference).expanduser()))
    folder = _snapshot(reference, revision)
    return Source(reference, folder, repo_id=reference, commit=Path(folder).name)


def resolve_recipe_sources(recipe: Recipe, problems: list[str]) -> tuple[Source, ...]:
    """The base's (first) and each input's local files; each failure is appended to ``problems``
    and leaves that source's ``local_path`` empty."""
    sources = []
    for where, reference, revision in [("base", recipe.base, recipe.revision)] + [
            (f"inputs[{i}]", spec.path, spec.revision) for i, spec in enumerate(recipe.inputs)]:
        try:
            sources.append(resolve_source(reference, revision))
        except StreamMergeError as e:
            problems.append(f"{where}: {e}")
            sources.append(Source(reference, ""))  # no local files: the planner skips it
    return tuple(sources)


def _snapshot(repo_id: str, revision: str | None) -> str:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub import errors as hf

    at = f" at revision {revision!r}" if revision else ""
    where = f"{repo_id!r} is not a local path, so it was looked up as a Hugging Face Hub repo id{at}, but"
    try:
        return snapshot_download(repo_id, revision=revision, allow_patterns=list(ALLOW_PATTERNS),
                                 ignore_patterns=list(IGNORE_PATTERNS))
    except hf.GatedRepoError as e:
        raise HubError(f"{where} the repo is gated: accept its terms on https://huggingface.co/{repo_id} and log in "
                       "(`hf auth login`, or set HF_TOKEN)") from e
    except hf.RevisionNotFoundError as e:
        raise HubError(f"{where} it has no revision {revision!r}; pass an existing branch, tag or commit "
                       "(--revision, or `revision:` in the recipe)") from e
    except hf.RepositoryNotFoundError as e:
        raise HubError(f"{where} no such repo exists, or it is private: check the spelling, or log in "
                       "(`hf auth login`, or set HF_TOKEN); for a local directory, check the path") from e
    except hf.IncompleteSnapshotError as e:
        raise HubError(f"{where} its cached snapshot is incomplete and the Hub cannot be reached: "
                       f"run `hf download {repo_id}` with network access ({e})") from e
    except hf.LocalEntryNotFoundError as e:
        if constants.is_offline_mode():
            why = ("HF_HUB_OFFLINE=1 is set and the repo is not in the local cache "
                   f"({constants.HF_HUB_CACHE}): download it first (`hf download {repo_id}`), point HF_HUB_CACHE "
                   "or HF_HOME at a cache that holds it, or pass a local directory")
        else:
            why = (f"the Hub cannot be reached and the repo is not in the local cache ({constants.HF_HUB_CACHE}): "
                   "check the network, or pass a local directory")
        raise HubError(f"{where} {why}") from e
    except (hf.HfHubHTTPError, OSError, ValueError) as e:
        raise HubError(f"{where} the lookup failed: {e}") from e
