"""The ``streammerge`` command: subcommands, argument parsing, progress, exit codes.

The only place that prints or exits; the library raises typed errors and this module maps
them to messages and exit codes (2: bad input, 3: output problem, 1: anything else).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .errors import InputError, StreamMergeError, exit_code_for
from .methods import REGISTRY, parse_param_assignment
from .modelcard import stats_summary
from .osrm.commands import add_osrm_commands
from .plan import MergePlan, build_plan
from .recipe import DEVICES, InputSpec, Recipe, parse_size

EPILOG_MERGE = """examples:
  streammerge merge --base ./Llama-3-8B --adapter ./lora_math --adapter ./lora_code \\
      --method task_arithmetic --out ./merged
  streammerge merge --base B --adapter X --adapter Y --weight 1.0 --weight 0.5 \\
      --method do_merging --param orthogonalize=false --param norm_axis=col --out O
  streammerge merge --base B --model ./ft_math --model ./ft_code --method ties --out O
"""


class _InputAction(argparse.Action):
    """Collects --adapter and --model in command-line order into one list."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        items = list(getattr(namespace, "inputs", None) or [])
        items.append((self.const, values))
        namespace.inputs = items


def _add_recipe_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", required=True, help="base model directory (safetensors, single file or sharded)")
    p.add_argument("--adapter", action=_InputAction, const="adapter", dest="inputs", metavar="DIR",
                   help="a PEFT LoRA adapter directory (repeatable)")
    p.add_argument("--model", action=_InputAction, const="model", dest="inputs", metavar="DIR",
                   help="a full fine-tuned model directory; task vector = model - base (repeatable)")
    p.add_argument("--weight", action="append", type=float, default=[], metavar="W",
                   help="weight w_i of each input, in input order (default 1 each)")
    p.add_argument("--method", default="task_arithmetic", choices=sorted(REGISTRY),
                   help="merge method (see `streammerge methods`); default task_arithmetic")
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                   help="method parameter, e.g. --param lambda=0.8 (repeatable)")
    p.add_argument("--dtype", default=None, help="output dtype of floating tensors (bfloat16, float16, float32); "
                                                 "default: keep each base tensor's dtype")
    p.add_argument("--device", default="auto", choices=DEVICES, help="worker device; auto = CUDA when present")
    p.add_argument("--seed", type=int, default=0, help="seed of the per-tensor random generators (DARE)")
    p.add_argument("--max-shard-size", default=None, metavar="SIZE",
                   help="reshard output into files of at most SIZE (e.g. 5GB); default: the base's layout")


def recipe_from_args(args: argparse.Namespace) -> Recipe:
    """Build the recipe the merge/plan subcommands describe."""
    inputs = list(getattr(args, "inputs", None) or [])
    weights = list(args.weight)
    if weights and len(weights) != len(inputs):
        raise InputError(
            f"got {len(weights)} --weight value(s) for {len(inputs)} input(s); give one per input, in input order")
    specs = tuple(InputSpec(path=path, kind=kind, weight=weights[i] if weights else 1.0)
                  for i, (kind, path) in enumerate(inputs))
    params = tuple(parse_param_assignment(text) for text in args.param)
    return Recipe(
        base=args.base, inputs=specs, method=args.method, params=params, dtype=args.dtype,
        seed=args.seed, device=args.device,
        max_shard_size=parse_size(args.max_shard_size) if args.max_shard_size else None)


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def describe_plan(plan: MergePlan) -> str:
    lines = [f"method {plan.recipe.method} {dict(plan.method_params)}",
             f"base {plan.recipe.base}"]
    for s in plan.inputs:
        lines.append(f"  input {s.index}: {s.kind} {s.path} (weight {s.weight:g}, {s.tensors_changed} tensors"
                     + (f", ranks {list(s.ranks)})" if s.ranks else ")"))
    lines.append(f"{plan.tensor_count} tensors ({plan.merged_count} merged) into {len(plan.shards)} shard(s), "
                 f"{_gib(plan.output_bytes)} output; predicted peak memory {_gib(plan.estimated_peak_bytes)}")
    return "\n".join(lines)


def cmd_merge(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .engine import run_plan

    recipe = recipe_from_args(args)
    plan = build_plan(recipe)
    print(describe_plan(plan), file=sys.stderr)
    bar = tqdm(total=plan.output_bytes, unit="B", unit_scale=True, unit_divisor=1024,
               desc="merging", disable=args.no_progress or None, file=sys.stderr)
    done = [0]

    def progress(name: str, nbytes: int) -> None:
        done[0] += 1
        bar.update(nbytes)
        bar.set_postfix_str(f"{done[0]}/{plan.tensor_count} tensors", refresh=False)

    try:
        report = run_plan(plan, Path(args.out), progress)
    finally:
        bar.close()
    summary = {
        "output": str(report.output_dir), "device": report.device, "seconds": round(report.seconds, 3),
        "peak_rss_mib": round(report.peak_rss / 2**20, 1), "tensors_merged": report.tensors_merged,
        "tensors_copied": report.tensors_copied, "bytes_written": report.bytes_written,
        "shards": [r.file_name for r in report.shards],
    }
    if report.stats:
        summary["method_stats"] = stats_summary(report.stats)
    print(json.dumps(summary, indent=2))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    plan = build_plan(recipe_from_args(args))
    print(describe_plan(plan))
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    for method in REGISTRY.values():
        print(f"{method.name}: {method.summary}")
        for p in method.params:
            choices = f" one of {list(p.choices)}" if p.choices else ""
            print(f"    {p.name} ({p.kind.__name__}, default {p.default!r}){choices}: {p.help}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streammerge",
        description="Streaming, out-of-core merging of LoRA adapters and fine-tunes into LLMs.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    merge = sub.add_parser("merge", help="merge inputs into a new model directory", epilog=EPILOG_MERGE,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_recipe_arguments(merge)
    merge.add_argument("--out", required=True, help="output directory (new or empty)")
    merge.add_argument("--no-progress", action="store_true", help="no progress bar")
    merge.set_defaults(handler=cmd_merge)

    plan = sub.add_parser("plan", help="validate a merge and print what it would do (dry run)",
                          epilog=EPILOG_MERGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_recipe_arguments(plan)
    plan.set_defaults(handler=cmd_plan)

    methods = sub.add_parser("methods", help="list merge methods with their parameters and defaults")
    methods.set_defaults(handler=cmd_methods)
    add_osrm_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except StreamMergeError as e:
        print(f"streammerge: error: {e}", file=sys.stderr)
        return exit_code_for(e)
    except KeyboardInterrupt:
        print("streammerge: interrupted; re-run the same command to start again", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
