"""The demo: build a small Llama-shaped model and three LoRA adapters with tools/synthetic.py,
merge them through the `streammerge` CLI, verify the result independently, print a summary.

    python tools/demo.py --out demo-out
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tools.synthetic import PRESETS, write_adapter, write_model  # noqa: E402

ADAPTERS = [  # (name, rank, alpha, targets)
    ("lora_math", 16, 32, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
    ("lora_code", 8, 16, ("q_proj", "v_proj", "down_proj")),
    ("lora_chat", 4, 4, ("o_proj", "up_proj")),
]


def load_dir(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model directory, through safetensors' own loader (independent of ours)."""
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


def dense_oracle(base: dict[str, torch.Tensor], adapters: list[Path], weights: list[float]) -> dict[str, torch.Tensor]:
    """W0 + Σ w_i (α_i/r_i) B_i A_i, written straight from the formula."""
    expected = {k: v.float() for k, v in base.items()}
    for adapter, weight in zip(adapters, weights):
        config = json.loads((adapter / "adapter_config.json").read_text())
        factors = load_file(str(adapter / "adapter_model.safetensors"))
        for key, a in factors.items():
            if ".lora_A." in key:
                module = key.removeprefix("base_model.model.").split(".lora_A.")[0]
                b = factors[key.replace("lora_A", "lora_B")]
                expected[module + ".weight"] += weight * config["lora_alpha"] / config["r"] * (b.float() @ a.float())
    return {k: v.to(base[k].dtype) for k, v in expected.items()}


def run(args: list[str]) -> tuple[dict, float]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "streammerge", *args, "--no-progress"], cwd=REPO,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"streammerge {' '.join(args)} failed:\n{proc.stderr}")
    return json.loads(proc.stdout), time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "demo-out")
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS))
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    base = write_model(args.out / "base", PRESETS[args.preset], "BF16", seed=0, max_shard_size=40 * 10**6)
    adapters = [write_adapter(base, args.out / name, rank, alpha, targets, seed=i + 1)
                for i, (name, rank, alpha, targets) in enumerate(ADAPTERS)]
    weights = [1.0, 0.7, 0.5]
    print(f"built {args.preset} base ({sum(f.stat().st_size for f in base.glob('*.safetensors')) / 2**20:.0f} MiB, "
          f"{len(list(base.glob('*.safetensors')))} shards) and {len(adapters)} adapters in {args.out}")

    common = ["--base", str(base)]
    for a in adapters:
        common += ["--adapter", str(a)]
    for w in weights:
        common += ["--weight", str(w)]
    rows = []
    ta_out = args.out / "merged_task_arithmetic"
    summary, wall = run(["merge", *common, "--method", "task_arithmetic", "--out", str(ta_out)])
    rows.append(("task_arithmetic", summary, wall))

    # Verification 1: an independent dense oracle, tensor by tensor.
    base_tensors = load_dir(base)
    expected = dense_oracle(base_tensors, adapters, weights)
    merged = load_dir(ta_out)
    assert set(merged) == set(expected), "output tensor names differ from the base"
    worst = 0.0
    for name, tensor in merged.items():
        ref = expected[name]
        diff = (tensor.float() - ref.float()).abs().max().item()
        scale = ref.float().abs().max().item() or 1.0
        worst = max(worst, diff / scale)
        if name.endswith("norm.weight") or "embed" in name or "lm_head" in name:
            assert torch.equal(tensor, base_tensors[name]), f"{name} should be byte-identical to the base"
    assert worst < 2 ** -7, f"merged weights deviate from the dense oracle by {worst:.3g} (relative)"
    checks = [f"matches the dense oracle W0 + Σ w_i s_i B_i A_i (max relative diff {worst:.2e}, bf16)",
              "untouched tensors byte-identical to the base"]

    # Verification 2: transformers loads the merged model and runs it.
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        checks.append("transformers not installed: load check skipped")
    else:
        model = AutoModelForCausalLM.from_pretrained(ta_out, dtype=torch.bfloat16)
        with torch.no_grad():
            logits = model(torch.arange(16).unsqueeze(0)).logits
        assert torch.isfinite(logits).all()
        checks.append(f"transformers loads it ({type(model).__name__}) and gives finite logits {tuple(logits.shape)}")

    from streammerge.methods import REGISTRY
    if "do_merging" in REGISTRY:
        do_out = args.out / "merged_do_merging"
        summary, wall = run(["merge", *common, "--method", "do_merging", "--out", str(do_out)])
        rows.append(("do_merging", summary, wall))

    print("\n| method | wall (s) | merge (s) | peak RSS (MiB) | tensors merged | copied | output |")
    print("|---|---|---|---|---|---|---|")
    for method, s, wall_s in rows:
        print(f"| {method} | {wall_s:.1f} | {s['seconds']:.1f} | {s['peak_rss_mib']:.0f} | {s['tensors_merged']} | "
              f"{s['tensors_copied']} | {s['output']} |")
    print("\nverified:")
    for c in checks:
        print(f"  - {c}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
