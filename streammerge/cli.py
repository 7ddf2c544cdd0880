"""The ``streammerge`` command: subcommands, argument parsing, progress, exit codes.

The only place that prints or exits; the library raises typed errors and this module maps
them to messages and exit codes (2: bad input, 3: output problem, 1: anything else).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import MISSING, fields, replace
from pathlib import Path
from typing import Any

from .errors import InputError, StreamMergeError, exit_code_for
from .methods import REGISTRY, parse_param_assignment
from .conventions import CONVENTIONS
from .jobs.modelcard import stats_summary
from .methods.extraction import SKIPPED_STAT
from .osrm.commands import add_osrm_commands
from .planning.describe import describe_plan
from .execution.engine import build_plan
from .sinks import sink_for
from .io.reader import open_checkpoint
from .names import EMBEDDING_SUFFIXES
from .mergekit_config import is_mergekit_document, translate_mergekit
from .recipe import (DEVICES, GGUF_TYPES, OUTPUT_FORMATS, InputSpec, Recipe, Weight, dump_recipe_yaml, parse_size,
                     read_document, recipe_from_dict)

ALLOW_PICKLE_HELP = ("read pickle-only adapters (adapter_model.bin) with torch.load(weights_only=True); without it "
                     "they are refused unread, as a pickle can run code when loaded. Base models and full "
                     "fine-tunes must be safetensors")
EPILOG_MERGE = """examples:
  streammerge merge --base ./Llama-3-8B --adapter ./lora_math --adapter ./lora_code \\
      --method task_arithmetic --out ./merged
  streammerge merge --base meta-llama/Llama-3.1-8B --adapter org/lora-math --revision main --out ./merged
  streammerge merge --base B --adapter X --adapter Y --weight 1.0 --weight 0,0.5,1 \\
      --method do_merging --param orthogonalize=false --param norm_axis=col --out O
  streammerge merge --base B --model ./ft_math --model ./ft_code --method ties --out O
  streammerge merge recipe.yaml --out O                 # a recipe file; flags override its values
  streammerge merge recipe.yaml --output-format adapter --out O   # a merged PEFT adapter (exact for TA / DO-Merging)
  streammerge merge recipe.yaml --method ties --output-format adapter --rank 64 --out O   # truncated SVD
  streammerge merge ./merged/streammerge_recipe.json --out O2   # re-run a saved, pinned recipe

--weight takes one value per input, in input order; "0,0.5,1" is a list interpolated from the
first layer to the last. Per-module weights and tensor filters live in recipe files (see README, "Recipes").
"""
EPILOG_PLAN = """examples:
  streammerge plan recipe.yaml
  streammerge plan --base ./Llama-3-8B --adapter ./lora_math --method do_merging --out ./merged
prints what will be read, merged, copied and written, with memory, disk and time estimates,
or every problem found (exit code 2), without writing anything.
"""
EPILOG_EXTRACT = """examples:
  streammerge extract --base ./Llama-3-8B --model ./Llama-3-8B-chat --rank 64 --out ./chat-lora
every changed matrix becomes lora_B @ lora_A = its best rank-K approximation (exact SVD, or a seeded
randomized SVD for matrices wider than 1024 on both sides), with truncation_error per module in the
summary and the model card; changed norms and biases go to modules_to_save. The same as
`streammerge merge --base B --model FT --output-format adapter --rank K` without the embeddings.
"""
EPILOG_INSPECT = """examples:
  streammerge inspect ./Llama-3-8B
  streammerge inspect ./lora_math --base ./Llama-3-8B     # does the adapter fit this base?
  streammerge inspect org/lora-math --json
"""


class _InputAction(argparse.Action):
    """Collects --adapter and --model in command-line order into one list."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        items = list(getattr(namespace, "inputs", None) or [])
        items.append((self.const, values))
        namespace.inputs = items


_CHOICES: dict[str, Any] = {"device": DEVICES, "output_format": OUTPUT_FORMATS, "method": sorted(REGISTRY),
                           "gguf_type": GGUF_TYPES, "conventions": CONVENTIONS}
_TYPES: dict[type, Any] = {int: int}


def _add_recipe_arguments(p: argparse.ArgumentParser) -> None:
    """One flag per Recipe field that has one; help text from the dataclass (the one source of truth)."""
    p.add_argument("recipe", nargs="?", default=None, metavar="RECIPE.yaml",
                   help="a recipe file (YAML or JSON), or a mergekit config (recognised by its merge_method); "
                        "the flags below override its values")
    p.add_argument("--mergekit", action="store_true",
                   help="read RECIPE.yaml as a mergekit config (the default when it names a merge_method)")
    defaults = {f.name: f.default for f in fields(Recipe)}
    for f in fields(Recipe):
        flag = f.metadata.get("flag")
        if flag is None:
            continue
        default = defaults[f.name]
        shown = f" (default: {default})" if default not in (None, "", MISSING, False) else ""
        if isinstance(default, bool):
            p.add_argument(flag, dest=f.name, default=None, action="store_const", const=True, help=f.metadata["help"])
            continue
        p.add_argument(flag, dest=f.name, default=None, choices=_CHOICES.get(f.name),
                       type=int if f.name in ("seed", "rank") else float if f.name == "min_relative_norm" else str,
                       metavar=f.metadata.get("metavar"), help=f.metadata["help"] + shown)
    p.add_argument("--adapter", action=_InputAction, const="adapter", dest="inputs", metavar="DIR_OR_REPO",
                   help="a PEFT LoRA adapter: local directory or Hub repo id (repeatable; replaces the file's inputs)")
    p.add_argument("--model", action=_InputAction, const="model", dest="inputs", metavar="DIR_OR_REPO",
                   help="a full fine-tuned model; task vector = model - base (repeatable)")
    p.add_argument("--weight", action="append", default=[], metavar="W",
                   help="weight w_i of each input, in input order (default 1 each); W1,W2,... is a per-layer list")
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                   help="method parameter, e.g. --param lambda=0.8 (repeatable; overrides the file's params)")


def _parse_weight(text: str) -> Weight:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise InputError(f"--weight expects a number or comma-separated numbers, got {text!r}") from None
    return values[0] if len(values) == 1 else values


def load_recipe_or_config(path: str, mergekit: bool = False) -> Recipe:
    """A recipe file, or a mergekit config translated (its notes printed to stderr)."""
    doc = read_document(path)
    if not (mergekit or is_mergekit_document(doc)):
        return recipe_from_dict(doc, source=path)
    translation = translate_mergekit(doc, source=path)
    for note in translation.notes:
        print(f"streammerge: {path}: {note}", file=sys.stderr)
    return translation.recipe


def recipe_from_args(args: argparse.Namespace) -> Recipe:
    """The recipe file (if any) with the command line's values laid over it."""
    recipe = (load_recipe_or_config(args.recipe, getattr(args, "mergekit", False)) if getattr(args, "recipe", None)
              else Recipe())
    changes: dict[str, Any] = {}
    for f in fields(Recipe):
        value = getattr(args, f.name, None)
        if f.metadata.get("flag") is None or value is None:
            continue
        changes[f.name] = parse_size(value) if f.metadata.get("parse") == "size" else value
    inputs = list(recipe.inputs)
    if getattr(args, "inputs", None):
        inputs = [InputSpec(path=path, kind=kind) for kind, path in args.inputs]
    if args.weight:
        if len(args.weight) != len(inputs):
            raise InputError(f"got {len(args.weight)} --weight value(s) for {len(inputs)} input(s); "
                             "give one per input, in input order")
        inputs = [replace(spec, weight=_parse_weight(w)) for spec, w in zip(inputs, args.weight)]
    changes["inputs"] = tuple(inputs)
    # A different --method drops the file's parameters, which belong to the file's method.
    params = {} if changes.get("method", recipe.method) != recipe.method else dict(recipe.params)
    params.update(parse_param_assignment(text) for text in args.param)
    changes["params"] = tuple(sorted(params.items()))
    return replace(recipe, **changes)


def cmd_merge(args: argparse.Namespace) -> int:
    recipe = recipe_from_args(args)
    if not recipe.out:
        raise InputError("no output directory: pass --out DIR (or set `out:` in the recipe file)")
    return _run(recipe, args)


def _run(recipe: Recipe, args: argparse.Namespace) -> int:
    """Plan ``recipe``, echo it, run it with a progress bar and print the JSON summary."""
    from tqdm import tqdm

    from .execution.distributed import Cohort, describe_split, detect_ranks
    from .execution.engine import run_plan
    from .execution.worker import resolve_device

    ranks = detect_ranks()
    plan = build_plan(recipe, allow_pickle=getattr(args, "allow_pickle", False))
    sink = sink_for(plan)
    lead = ranks is None or ranks.rank == 0
    if lead:
        print("resolved recipe:\n" + dump_recipe_yaml(plan.resolved_recipe()), file=sys.stderr)
        print(describe_plan(plan, sink.describe(), sink.output_bytes()), file=sys.stderr)
        if ranks is not None:
            print(describe_split(sink.units(), ranks.world_size), file=sys.stderr)
    bar = tqdm(total=sum(t.out_bytes for t in plan.tensors), unit="B", unit_scale=True, unit_divisor=1024,
               desc="merging", disable=args.no_progress or not lead or None, file=sys.stderr)
    done = [0]

    def progress(name: str, nbytes: int) -> None:
        done[0] += 1
        bar.update(nbytes)
        bar.set_postfix_str(f"{done[0]}/{plan.tensor_count} tensors", refresh=False)

    try:
        check_finite = getattr(args, "check_finite", True)
        if ranks is None:
            report = run_plan(plan, Path(str(recipe.out)), progress, restart=args.restart, check_finite=check_finite)
        else:
            with Cohort(ranks, resolve_device(plan.recipe.device)) as cohort:
                report = run_plan(plan, Path(str(recipe.out)), progress, restart=args.restart,
                                  check_finite=check_finite, cohort=cohort)
    finally:
        bar.close()
    if not lead:
        print(f"streammerge: rank {ranks.rank}: wrote {report.units} unit(s), {report.bytes_written:,} bytes, "
              f"in {report.seconds:.1f} s", file=sys.stderr)
        return 0
    for note in report.notes:
        print(f"streammerge: {note}", file=sys.stderr)
    if report.already_complete:
        print(f"streammerge: {recipe.out!r} already holds this job, finished; nothing to do "
              "(`streammerge verify` checks every checksum)", file=sys.stderr)
    elif report.resumed_units:
        print(f"streammerge: resumed: {report.resumed_units} of {report.units} output unit(s) were finished "
              "by an earlier run; verified and kept", file=sys.stderr)
    summary = {
        "output": str(report.output_dir), "format": recipe.output_format, "device": report.device,
        "seconds": round(report.seconds, 3), "peak_rss_mib": round(report.peak_rss / 2**20, 1),
        "peak_anon_rss_mib": round(report.peak_anon_rss / 2**20, 1),
        "tensors_merged": report.tensors_merged, "tensors_copied": report.tensors_copied,
        "bytes_written": report.bytes_written, "files": [r.file_name for r in report.files],
        "units": report.units, "resumed_units": report.resumed_units, "already_complete": report.already_complete,
    }
    if report.peak_gpu_bytes:
        summary["peak_gpu_mib"] = round(report.peak_gpu_bytes / 2**20, 1)
    if report.stats:
        summary["method_stats"] = stats_summary(report.stats)
        skipped = sorted(n for n, st in report.stats.items() if st.get(SKIPPED_STAT))
        if skipped:
            summary[SKIPPED_STAT] = skipped
    print(json.dumps(summary, indent=2))
    return 0


# Tensors `extract` leaves out unless --embed-lora: token / position embeddings and the output head.
_EXTRACT_EXCLUDED = tuple("*" + suffix for suffix in EMBEDDING_SUFFIXES) + ("lm_head.weight",)


def cmd_extract(args: argparse.Namespace) -> int:
    """A full fine-tune → a PEFT LoRA adapter: the rank-K truncated SVD of every task vector, streamed."""
    exclude: tuple[str, ...] = ()
    if not args.embed_lora and Path(args.base).is_dir():
        names = open_checkpoint(args.base).shard_of
        exclude = tuple(p for p in _EXTRACT_EXCLUDED if any(fnmatch.fnmatchcase(n, p) for n in names))
    recipe = Recipe(base=args.base, inputs=(InputSpec(args.model, kind="model", exclude=exclude),),
                    method="task_arithmetic", output_format="adapter", rank=args.rank, dtype=args.dtype,
                    device=args.device, seed=args.seed, out=args.out, min_relative_norm=args.min_relative_norm)
    return _run(recipe, args)


def cmd_plan(args: argparse.Namespace) -> int:
    from .execution.distributed import describe_split, detect_ranks

    plan = build_plan(recipe_from_args(args), allow_pickle=args.allow_pickle)
    sink = sink_for(plan)
    ranks = detect_ranks()
    world = args.world_size or (ranks.world_size if ranks is not None else 1)
    if ranks is not None and ranks.rank > 0:
        return 0  # rank 0 prints the plan
    print("resolved recipe:\n" + dump_recipe_yaml(plan.resolved_recipe()))
    print(describe_plan(plan, sink.describe(), sink.output_bytes()))
    if world > 1:
        print(describe_split(sink.units(), world))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from .planning.inspection import inspect_path, render_inspection

    report = inspect_path(args.path, base=args.base, revision=args.revision, base_revision=args.base_revision)
    print(json.dumps(report, indent=2, default=str) if args.json else render_inspection(report))
    return 0 if report.get("compatible", True) else 2


def cmd_verify(args: argparse.Namespace) -> int:
    from .jobs.verify import verify_output

    result = verify_output(args.out)
    for line in result.checked:
        print(f"ok       {line}")
    for line in result.notes:
        print(f"note     {line}")
    for line in result.problems:
        print(f"PROBLEM  {line}")
    print(f"{args.out}: " + ("all files check out" if result.ok else f"{len(result.problems)} problem(s)"))
    return 0 if result.ok else 1


def cmd_convert_config(args: argparse.Namespace) -> int:
    """Print the native recipe that a mergekit config translates to."""
    recipe = load_recipe_or_config(args.config, mergekit=True)
    print(dump_recipe_yaml(recipe), end="")
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    for method in REGISTRY.values():
        print(f"{method.name}: {method.summary}")
        for p in method.params:
            choices = f" one of {list(p.choices)}" if p.choices else ""
            print(f"    {p.name} ({p.kind.__name__}, default {p.default!r}){choices}: {p.help}")
    return 0


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streammerge",
        description="Streaming, out-of-core merging of LoRA adapters and fine-tunes into LLMs.",
        epilog="Run `streammerge COMMAND --help` for a command's options and examples.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    merge = sub.add_parser("merge", help="merge inputs into a new model directory (or a merged adapter)",
                           epilog=EPILOG_MERGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_recipe_arguments(merge)
    merge.add_argument("--no-progress", action="store_true", help="no progress bar")
    merge.add_argument("--restart", action="store_true",
                       help="discard the job found in --out (interrupted, or finished with another recipe) and start "
                            "over; without it, re-running the same command resumes (finished shards are verified and "
                            "kept) and a finished job is left as it is. Files streammerge did not write are never "
                            "deleted")
    merge.add_argument("--check-finite", action=argparse.BooleanOptionalAction, default=True,
                       help="refuse adapters holding NaN or Inf before anything is written (reads their factors "
                            "once more; default on)")
    merge.add_argument("--allow-pickle", action="store_true", help=ALLOW_PICKLE_HELP)
    merge.set_defaults(handler=cmd_merge)

    plan = sub.add_parser("plan", help="validate a merge and print what it would do (dry run)",
                          epilog=EPILOG_PLAN, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_recipe_arguments(plan)
    plan.add_argument("--allow-pickle", action="store_true", help=ALLOW_PICKLE_HELP)
    plan.add_argument("--world-size", type=_positive_int, default=None, metavar="N",
                      help="also show how N ranks (torchrun processes) would split the output units "
                           "(default: WORLD_SIZE under torchrun)")
    plan.set_defaults(handler=cmd_plan)

    inspect = sub.add_parser("inspect", help="describe a model or adapter, and whether it fits a base",
                             epilog=EPILOG_INSPECT, formatter_class=argparse.RawDescriptionHelpFormatter)
    inspect.add_argument("path", metavar="PATH_OR_REPO", help="a model or PEFT adapter directory, or a Hub repo id")
    inspect.add_argument("--base", default=None, metavar="DIR_OR_REPO", help="check compatibility with this base model")
    inspect.add_argument("--revision", default=None, metavar="REV", help="Hub revision of PATH")
    inspect.add_argument("--base-revision", default=None, metavar="REV", help="Hub revision of --base")
    inspect.add_argument("--json", action="store_true", help="print the report as JSON")
    inspect.set_defaults(handler=cmd_inspect)

    verify = sub.add_parser("verify", help="check a merged model directory: every shard and file against the "
                                           "job journal (size, SHA-256), headers and index",
                            description="Exit code 0 when every file checks out, 1 when anything is wrong.")
    verify.add_argument("out", metavar="OUT", help="a directory written by `streammerge merge`")
    verify.set_defaults(handler=cmd_verify)

    extract = sub.add_parser("extract", help="extract a LoRA adapter from a full fine-tune (rank-K SVD of FT - base)",
                             epilog=EPILOG_EXTRACT, formatter_class=argparse.RawDescriptionHelpFormatter)
    extract.add_argument("--base", required=True, metavar="DIR_OR_REPO", help="the base model")
    extract.add_argument("--model", required=True, metavar="DIR_OR_REPO", help="the full fine-tune of the base")
    extract.add_argument("--rank", required=True, type=int, metavar="K", help="rank of every extracted module")
    extract.add_argument("--out", required=True, metavar="DIR", help="output adapter directory (new or empty)")
    extract.add_argument("--embed-lora", action="store_true",
                         help="also extract the embeddings and lm_head (default: left out)")
    extract.add_argument("--min-relative-norm", type=float, default=None, metavar="X",
                         help="leave out a module whose update is small: ||FT - B||_F <= X * ||B||_F (e.g. 0.001); "
                              "the skipped modules are listed in the summary")
    extract.add_argument("--dtype", default=None, help="dtype of the written factors (default float32)")
    extract.add_argument("--device", default="auto", choices=DEVICES, help="worker device")
    extract.add_argument("--seed", type=int, default=0, help="seed of the randomized SVD sketches")
    extract.add_argument("--no-progress", action="store_true", help="no progress bar")
    extract.add_argument("--restart", action="store_true", help="discard a job found in --out and start over")
    extract.set_defaults(handler=cmd_extract)

    convert = sub.add_parser("convert-config",
                             help="print the streammerge recipe (YAML) equivalent to a mergekit config",
                             description="Translate a mergekit YAML config into a streammerge recipe with "
                                         "conventions: mergekit; every problem is reported with its field path.")
    convert.add_argument("config", metavar="MERGEKIT.yml", help="a mergekit configuration file")
    convert.set_defaults(handler=cmd_convert_config)

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
        print("streammerge: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
