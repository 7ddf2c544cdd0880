"""How much room is there for interference? Statistics of the trained task vectors
``ΔW_i = s B_i A_i`` over every adapted module: size relative to the base weight, pairwise
cosine between tasks, and the normalised cross-Gram overlap of the A's and B's that
DO-Merging's orthogonalization works on (compared with what random factors of the same shape
give). Reads the adapter files only; prints a markdown table.

    .venv/bin/python benchmarks/quality/task_vectors.py [--cache DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ADAPTERS_SUBDIR, DEFAULT_CACHE, MODEL_SUBDIR  # noqa: E402
from train import RESULTS  # noqa: E402


def cross(mats: list[torch.Tensor]) -> float:
    """sqrt(Σ_{i≠j} ‖X_i X_jᵀ‖²) of Frobenius-normalised X_i (rows in the shared space)."""
    xs = [m / m.norm() for m in mats]
    return sum(float((xs[i] @ xs[j].T).square().sum()) for i in range(len(xs)) for j in range(len(xs)) if i != j) ** 0.5


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from safetensors.torch import load_file

    tasks = sorted(json.loads((args.cache / RESULTS).read_text()))
    base = load_file(str(args.cache / MODEL_SUBDIR / "model.safetensors"))
    ads, scale = {}, {}
    for t in tasks:
        d = args.cache / ADAPTERS_SUBDIR / t
        cfg = json.loads((d / "adapter_config.json").read_text())
        ads[t], scale[t] = load_file(str(d / "adapter_model.safetensors")), cfg["lora_alpha"] / cfg["r"]
    modules = sorted({k.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
                      for k in ads[tasks[0]] if k.endswith("lora_A.weight")})
    gen = torch.Generator().manual_seed(0)
    rows: dict[str, list[float]] = {k: [] for k in ("rel", "cos_mean", "cos_max", "a", "a_rand", "b", "b_rand")}
    for mod in modules:
        w = base[f"model.{mod}.weight"]
        a = [ads[t][f"base_model.model.{mod}.lora_A.weight"] for t in tasks]
        b = [ads[t][f"base_model.model.{mod}.lora_B.weight"] for t in tasks]
        deltas = [scale[t] * bi @ ai for t, ai, bi in zip(tasks, a, b)]
        rows["rel"] += [float(d.norm() / w.norm()) for d in deltas]
        flat = torch.stack([d.flatten() / d.norm() for d in deltas])
        off = (flat @ flat.T)[~torch.eye(len(tasks), dtype=torch.bool)]
        rows["cos_mean"].append(float(off.abs().mean()))
        rows["cos_max"].append(float(off.abs().max()))
        rows["a"].append(cross(a))
        rows["b"].append(cross([x.T for x in b]))
        rows["a_rand"].append(cross([torch.randn(x.shape, generator=gen) for x in a]))
        rows["b_rand"].append(cross([torch.randn(x.T.shape, generator=gen) for x in b]))
    med = {k: statistics.median(v) for k, v in rows.items()}
    print(f"{len(modules)} modules × {len(tasks)} tasks ({', '.join(tasks)}); medians over modules\n")
    print("| statistic | median | max |\n|---|---|---|")
    print(f"| ‖ΔW_i‖ / ‖W0‖ | {med['rel']:.4f} | {max(rows['rel']):.4f} |")
    print(f"| mean \\|cos(ΔW_i, ΔW_j)\\|, i≠j | {med['cos_mean']:.4f} | {max(rows['cos_mean']):.4f} |")
    print(f"| max \\|cos(ΔW_i, ΔW_j)\\|, i≠j | {med['cos_max']:.4f} | {max(rows['cos_max']):.4f} |")
    print(f"| cross-Gram of the A's (trained) | {med['a']:.3f} | {max(rows['a']):.3f} |")
    print(f"| cross-Gram of the A's (random factors, same shapes) | {med['a_rand']:.3f} | {max(rows['a_rand']):.3f} |")
    print(f"| cross-Gram of the B's (trained) | {med['b']:.3f} | {max(rows['b']):.3f} |")
    print(f"| cross-Gram of the B's (random factors, same shapes) | {med['b_rand']:.3f} | {max(rows['b_rand']):.3f} |")


if __name__ == "__main__":
    main()
