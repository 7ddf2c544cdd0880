"""PEFT adapter directories for OSRM: new initialisations, and projections of trained adapters.

An OSRM initialisation is a plain PEFT LoRA adapter: ``lora_A`` = the OSRM subspace,
``lora_B`` = 0 and an ``adapter_config.json`` with ``init_lora_weights: true``.  That value
only decides what PEFT puts in the layers *before* ``PeftModel.from_pretrained`` loads the
saved weights over them, so the saved ``A`` is what training starts from; values such as
``"pissa"``/``"olora"`` would rewrite the base weights and must not be used.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..inputs.lora import PEFT_PREFIX
from ..inputs.peft_config import peft_lora_config
from ..errors import OutputError
from ..io.atomic import write_bytes_atomic
from ..io.writer import save_tensors
from ..names import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME

__all__ = ["OSRM_INFO_NAME", "lora_key", "lora_init_config", "write_adapter_dir", "copy_adapter_files"]

OSRM_INFO_NAME = "osrm.json"


def lora_key(module: str, part: str) -> str:
    """PEFT's saved key for a factor: ``base_model.model.<module>.lora_A.weight``."""
    return f"{PEFT_PREFIX}{module}.{part}.weight"


def lora_init_config(base: str, target_modules: Sequence[str], rank: int, alpha: float, *,
                     fan_in_fan_out: bool, task_type: str | None, lora_dropout: float = 0.0) -> dict[str, Any]:
    """An ``adapter_config.json`` document PEFT loads as a plain LoRA to train from (and streammerge merges)."""
    targets: str | list[str] = "all-linear" if list(target_modules) == ["all-linear"] else sorted(target_modules)
    return peft_lora_config(base=base, target_modules=targets, r=rank, lora_alpha=alpha, task_type=task_type,
                            fan_in_fan_out=fan_in_fan_out, lora_dropout=lora_dropout, inference_mode=False)


def _json_bytes(doc: Mapping[str, Any]) -> bytes:
    return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode("utf-8")


def write_adapter_dir(out_dir: Path, tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any] | None,
                      info: Mapping[str, Any]) -> Path:
    """Write ``adapter_model.safetensors``, ``osrm.json`` and (unless None) ``adapter_config.json``."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create the adapter directory {str(out_dir)!r}: {e.strerror or e}") from e
    save_tensors(out_dir / ADAPTER_WEIGHTS_NAME, {k: v.detach().cpu().contiguous() for k, v in tensors.items()})
    if config is not None:
        write_bytes_atomic(out_dir / ADAPTER_CONFIG_NAME, _json_bytes(config))
    write_bytes_atomic(out_dir / OSRM_INFO_NAME, _json_bytes(info))
    return out_dir


def copy_adapter_files(src: Path, out_dir: Path) -> None:
    """Copy an adapter's side files (config, tokenizer, card), not its weights, into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for path in Path(src).iterdir():
        if path.is_file() and path.name not in (ADAPTER_WEIGHTS_NAME, OSRM_INFO_NAME):
            try:
                shutil.copyfile(path, out_dir / path.name)
            except OSError as e:
                raise OutputError(f"cannot copy {str(path)!r} to {str(out_dir)!r}: {e.strerror or e}") from e
