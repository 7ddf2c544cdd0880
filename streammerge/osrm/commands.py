"""The ``osrm-init`` and ``osrm-project`` subcommands (registered by ``add_osrm_commands``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..errors import InputError
from .subspace import VARIANTS

__all__ = ["add_osrm_commands", "parse_tasks"]

EPILOG_INIT = """examples:
  streammerge osrm-init --base ./Llama-3-8B --task math=math.jsonl --task code=code.txt \\
      --target-modules q_proj v_proj --rank 16 --out ./osrm
  # later, a third task: only its statistics are computed, the others come from ./osrm/.osrm_stats
  streammerge osrm-init --base ./Llama-3-8B --task math=math.jsonl --task code=code.txt \\
      --task law=law.jsonl --only law --target-modules q_proj v_proj --rank 16 --out ./osrm
  # then train each task from its adapter, e.g. with PEFT:
  #   PeftModel.from_pretrained(base_model, "./osrm/law", is_trainable=True)

task files: plain text (one example per line) or .jsonl/.json lines with a "text" field
(--text-field) or pre-tokenized {"input_ids": [...]} (no tokenizer needed).
"""

EPILOG_PROJECT = """examples:
  streammerge osrm-project --adapter ./lora_math --base ./Llama-3-8B --own math \\
      --task math=math.jsonl --task code=code.txt --task law=law.jsonl --out ./osrm/math_projected
"""


def parse_tasks(items: list[str]) -> dict[str, Path]:
    """``["math=a.jsonl", "code=b.txt"]`` → ``{"math": Path("a.jsonl"), ...}``, names unique."""
    tasks: dict[str, Path] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise InputError(f"--task {item!r} must look like NAME=FILE, e.g. --task math=math.jsonl")
        if name in tasks:
            raise InputError(f"task {name!r} is given twice (--task {name}=...); task names must be unique")
        tasks[name] = Path(path)
    return tasks


def _add_collect_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", required=True, help="base model directory (transformers format)")
    p.add_argument("--task", action="append", default=[], required=True, metavar="NAME=FILE",
                   help="a task's unlabelled data (repeatable)")
    p.add_argument("--variant", default="covariance", choices=VARIANTS,
                   help="covariance (paper; uncentred second moment of the other tasks' features) or means "
                        "(null space of their mean features; cheaper); default covariance")
    p.add_argument("--center", action="store_true",
                   help="covariance variant: subtract each task's mean (ablation; default uncentred)")
    p.add_argument("--max-examples", type=int, default=256, help="examples read per task (default 256)")
    p.add_argument("--max-length", type=int, default=512, help="tokens per example, truncated (default 512)")
    p.add_argument("--batch-size", type=int, default=8, help="examples per forward pass (default 8)")
    p.add_argument("--text-field", default="text", help="the text field of JSONL task files (default text)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="where the model runs; auto = CUDA when present")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="model compute dtype; auto = bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--max-memory", default=None, metavar="SPEC",
                   help="for models larger than memory: accelerate budget per device, e.g. cuda=20GiB,cpu=60GiB; "
                        "layers past it are offloaded to CPU/disk and streamed in layer by layer")
    p.add_argument("--offload-dir", default=None, help="disk offload folder for --max-memory "
                                                       "(default <stats dir>/offload)")
    p.add_argument("--stats-dir", default=None, help="statistics cache (default .osrm_stats next to the adapters)")
    p.add_argument("--stats-on-cpu", action="store_true",
                   help="keep the running d×d sums in host RAM instead of GPU memory")
    p.add_argument("--backbone", action="store_true",
                   help="use the bare backbone (transformers AutoModel, no LM head): for adapters trained on it, "
                        "whose module names lack the causal LM's 'model.' prefix")
    p.add_argument("--stats-memory", default=None, metavar="SIZE",
                   help="memory the running d×d float64 sums may take at once, e.g. 16GiB; past it the "
                        "modules are split into groups and the data is run once per group (default: no limit)")


def _collect_options(args: argparse.Namespace) -> Any:
    from ..recipe import parse_size
    from .run import CollectOptions

    return CollectOptions(max_examples=args.max_examples, max_length=args.max_length, batch_size=args.batch_size,
                          text_field=args.text_field, device=args.device, dtype=args.dtype,
                          max_memory=args.max_memory, offload_dir=args.offload_dir, stats_dir=args.stats_dir,
                          stats_on_cpu=args.stats_on_cpu, backbone=args.backbone,
                          stats_memory=parse_size(args.stats_memory) if args.stats_memory else None)


def _print(report: dict[str, Any]) -> None:
    for warning in report.get("warnings", []):
        print(f"streammerge: warning: {warning}", file=sys.stderr)
    print(json.dumps(report, indent=2))


def cmd_osrm_init(args: argparse.Namespace) -> int:
    from .run import osrm_init

    report = osrm_init(args.base, parse_tasks(args.task), args.out, target_modules=args.target_modules,
                       rank=args.rank, alpha=args.alpha, variant=args.variant, center=args.center,
                       only=args.only or None, lora_dropout=args.lora_dropout, opts=_collect_options(args))
    _print(report)
    return 0


def cmd_osrm_project(args: argparse.Namespace) -> int:
    from .run import osrm_project

    report = osrm_project(args.adapter, args.base, parse_tasks(args.task), args.out, own=args.own,
                          variant=args.variant, center=args.center, opts=_collect_options(args))
    _print(report)
    return 0


def add_osrm_commands(subparsers: Any) -> None:
    """Register ``osrm-init`` and ``osrm-project`` on the ``streammerge`` subcommand parser."""
    init = subparsers.add_parser(
        "osrm-init", help="OSRM: LoRA initialisations whose A ignores the other tasks' features (before training)",
        epilog=EPILOG_INIT, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_collect_arguments(init)
    init.add_argument("--target-modules", nargs="+", required=True, metavar="NAME",
                      help="PEFT target_modules: module name suffixes (q_proj v_proj …) or all-linear")
    init.add_argument("--rank", type=int, required=True, help="LoRA rank r")
    init.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default 2·rank)")
    init.add_argument("--lora-dropout", type=float, default=0.0, help="lora_dropout written to the config")
    init.add_argument("--only", action="append", default=[], metavar="NAME",
                      help="write adapters for these tasks only (repeatable; statistics still use every task)")
    init.add_argument("--out", required=True, help="output directory: one adapter directory per task")
    init.set_defaults(handler=cmd_osrm_init)

    project = subparsers.add_parser(
        "osrm-project", help="OSRM post-hoc: project a trained LoRA adapter onto the other tasks' OSRM subspace",
        epilog=EPILOG_PROJECT, formatter_class=argparse.RawDescriptionHelpFormatter)
    project.add_argument("--adapter", required=True, help="the trained PEFT LoRA adapter directory")
    _add_collect_arguments(project)
    project.add_argument("--own", default=None, metavar="NAME",
                         help="the adapter's own task among --task (excluded from the other tasks)")
    project.add_argument("--out", required=True, help="output adapter directory")
    project.set_defaults(handler=cmd_osrm_project)
