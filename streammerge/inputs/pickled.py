"""Pickled PEFT adapters (``adapter_model.bin``), only when the user allows it (``--allow-pickle``).

A pickle can run any code when it is loaded, so streammerge never unpickles one unless asked,
and then only through ``torch.load(weights_only=True)``, whose restricted unpickler builds
tensors and plain containers and refuses everything else.  The tensors are written once as
safetensors into a cache folder named by the pickle's SHA-256, and the merge reads that file
like any other: the same pickle always gives the same file (and path), so a resumed job sees
the same input.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

from ..errors import AdapterError, OutputError
from ..names import ADAPTER_PICKLE_NAME, ADAPTER_WEIGHTS_NAME, CACHE_DIR_ENV, PICKLE_CACHE_SUBDIR

__all__ = ["cache_root", "convert_pickled_adapter"]


def cache_root() -> Path:
    """``$STREAMMERGE_CACHE_DIR``, else ``$XDG_CACHE_HOME/streammerge`` (``~/.cache/streammerge``)."""
    explicit = os.environ.get(CACHE_DIR_ENV)
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "streammerge"


def convert_pickled_adapter(path: Path) -> Path:
    """Load ``adapter_model.bin`` with ``torch.load(weights_only=True)`` and cache it as safetensors.

    Returns:
        The cached ``adapter_model.safetensors``.

    Raises:
        AdapterError: the pickle holds anything but a mapping of names to tensors, or cannot be read.
    """
    import torch

    from ..io.dtypes import safetensors_name
    from ..io.writer import save_tensors

    where = f"adapter {str(path.parent)!r}"
    try:
        data = path.read_bytes()
    except OSError as e:
        raise AdapterError(f"{where}: cannot read {ADAPTER_PICKLE_NAME}: {e.strerror or e}") from e
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure of a hostile file is the same answer
        raise AdapterError(
            f"{where}: {ADAPTER_PICKLE_NAME} cannot be loaded safely with torch.load(weights_only=True) "
            f"({type(e).__name__}: {str(e)[:300]}); it holds something other than tensors. Re-save the adapter "
            "with PEFT's save_pretrained(safe_serialization=True).") from e
    if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise AdapterError(f"{where}: {ADAPTER_PICKLE_NAME} must hold a mapping of tensor names to tensors, "
                           f"found {type(state).__name__}")
    tensors = {}
    for key, tensor in state.items():
        try:
            safetensors_name(tensor.dtype)
        except KeyError:
            raise AdapterError(f"{where}: tensor {key!r} in {ADAPTER_PICKLE_NAME} has dtype {tensor.dtype}, "
                               "which safetensors cannot store") from None
        tensors[key] = tensor.detach().contiguous()
    target = cache_root() / PICKLE_CACHE_SUBDIR / hashlib.sha256(data).hexdigest() / ADAPTER_WEIGHTS_NAME
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create the cache folder {str(target.parent)!r} for the converted adapter: "
                          f"{e.strerror or e}; set {CACHE_DIR_ENV} to a writable folder") from e
    save_tensors(target, tensors)  # rewritten every time: never trust what is already there
    return target
