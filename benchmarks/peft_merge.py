"""PEFT's own way to merge several LoRA adapters into a model (the peer in bench_peers.py).

Load the base (bf16), load every adapter, ``add_weighted_adapter(..., combination_type="cat")``
(exact: rank Σ r_i, W0 + Σ w_i s_i B_i A_i, i.e. Task Arithmetic with λ = 1),
``merge_and_unload`` and ``save_pretrained`` — everything in memory, as PEFT users do.

    .venv/bin/python benchmarks/peft_merge.py --base B --adapter A1 --adapter A2 --out O
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True)
    parser.add_argument("--adapter", action="append", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.bfloat16)
    names = [f"a{i}" for i in range(len(args.adapter))]
    peft_model = PeftModel.from_pretrained(model, args.adapter[0], adapter_name=names[0])
    for name, path in zip(names[1:], args.adapter[1:]):
        peft_model.load_adapter(path, adapter_name=name)
    peft_model.add_weighted_adapter(names, [1.0] * len(names), adapter_name="merged", combination_type="cat")
    peft_model.set_adapter("merged")
    for name in names:
        peft_model.delete_adapter(name)
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(args.out)
    print(json.dumps({"seconds": round(time.perf_counter() - start, 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
