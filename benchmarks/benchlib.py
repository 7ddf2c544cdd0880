"""Shared pieces of the benchmarks: machine facts, input generation, cold caches, measured
subprocesses, the read+write floor, markdown tables and JSON results.

Every measured command runs in its own child process; its peak RSS is the kernel's
high-water mark for that child (``os.wait4`` → ``ru_maxrss``), cross-checked by sampling the
child's tree with psutil.  Inputs are evicted from the page cache before every timed run
(``posix_fadvise(DONTNEED)`` on each input file), so the floor and every tool read from disk
alike; ``--warm`` keeps the cache instead.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parent.parent
MAIN_PY = Path(os.environ.get("STREAMMERGE_BENCH_PYTHON", REPO / ".venv" / "bin" / "python"))
PEERS_BIN = REPO / "benchmarks" / ".venv-peers" / "bin"
BENCH_OUT = REPO / "bench-out"
DATA = Path(os.environ.get("STREAMMERGE_BENCH_DATA", "/tmp/bench"))
MODELS = DATA / "models"
SCRATCH = DATA / "scratch"
GIB = 1 << 30
MIB = 1 << 20
COPY_CHUNK = 64 * MIB
FLOOR_WRITEBACK = 256 * MIB  # the engine's write-back interval, so the floor writes the way it must
ADAPTER_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
SRC = REPO  # where streammerge and tools/ are run from; see use_source()
SRC_REF = "worktree"
HAS_CUDA = subprocess.run([str(MAIN_PY), "-c", "import torch; print(torch.cuda.is_available())"],
                          capture_output=True, text=True).stdout.strip() == "True"


# Process-level knobs (environment only; the code is unchanged), for A/B evidence on engine changes.
NO_MMAP = {"MALLOC_MMAP_THRESHOLD_": str(1 << 32), "MALLOC_TRIM_THRESHOLD_": str(1 << 32)}
VARIANTS: dict[str, dict[str, str]] = {
    "default": {},  # as a user runs it: torch's default intra-op threads (= cores)
    "omp1": {"OMP_NUM_THREADS": "1"},  # one compute thread; the writer thread gets the other core
    "malloc": NO_MMAP,  # glibc keeps freed large blocks: no mmap/munmap + page faults per block
    "omp1+malloc": {"OMP_NUM_THREADS": "1", **NO_MMAP},
    "thp": {"THP_MEM_ALLOC_ENABLE": "1"},  # torch asks for transparent huge pages
}


# ---------------------------------------------------------------- machine and provenance

def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def _tree_sha(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted((root / "streammerge").rglob("*.py")):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def _committed_sha(commit: str) -> str:
    """``_tree_sha`` of streammerge/ at ``commit``."""
    tmp = DATA / f"src-{commit}"
    if not (tmp / ".complete").is_file():
        prepare_source(commit)
    return _tree_sha(tmp)


def prepare_source(ref: str) -> Path:
    """The streammerge sources to benchmark, copied once under DATA so concurrent edits cannot
    change a run: ``snapshot`` (this checkout's streammerge/ and tools/ as they are now, named by
    their hash), ``worktree`` (the checkout itself, no copy), a directory holding ``streammerge/``
    (an earlier snapshot) or a git ref (``git archive``)."""
    if ref == "worktree":
        return REPO
    if (Path(ref) / "streammerge").is_dir():  # an earlier snapshot, to keep a series on the same code
        return Path(ref)
    if ref == "snapshot":
        dest = DATA / f"src-snap-{_tree_sha(REPO)}"
        if not (dest / ".complete").is_file():
            remove(dest)
            for part in ("streammerge", "tools"):
                shutil.copytree(REPO / part, dest / part, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            (dest / ".complete").touch()
        return dest
    commit = _git("rev-parse", "--short", ref)
    if not commit:
        raise SystemExit(f"unknown git ref {ref!r}")
    dest = DATA / f"src-{commit}"
    if not (dest / ".complete").is_file():
        remove(dest)
        dest.mkdir(parents=True)
        archive = subprocess.run(["git", "archive", commit, "streammerge", "tools"], cwd=REPO,
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
        (dest / ".complete").touch()
    return dest


def smoke_test() -> None:
    """A tiny merge with the sources under test, so a broken checkout fails fast, not mid-benchmark."""
    model = ensure_model("tiny", "tiny")
    inputs = [("adapter", p) for p in ensure_adapters(model, 2)]
    out = SCRATCH / "smoke"
    remove(out)
    result = subprocess.run(streammerge_command(model, inputs, "task_arithmetic", out), cwd=SRC,
                            capture_output=True, text=True)
    remove(out)
    if result.returncode != 0:
        raise SystemExit(f"the streammerge sources in {SRC} fail a tiny merge (rc {result.returncode}); "
                         f"retry later or pass --source <git ref>:\n{result.stderr[-1500:]}")


def add_source_argument(parser: Any) -> None:
    """The ``--source`` option every benchmark takes (see ``use_source``)."""
    parser.add_argument("--source", default="snapshot",
                        help="snapshot (copy of this checkout now; default), worktree, or a git ref")


def use_source(ref: str) -> Path:
    """Make every later streammerge / tools command run from ``prepare_source(ref)``; smoke-test it."""
    global SRC, SRC_REF
    SRC, SRC_REF = prepare_source(ref), ref
    smoke_test()
    return SRC


def source_fingerprint() -> dict[str, Any]:
    """The sources benchmarked: the checkout's commit, whether streammerge/ differed from it, a hash."""
    if SRC.name.startswith("src-") and not SRC.name.startswith("src-snap-"):  # a git ref
        commit, dirty = SRC.name.removeprefix("src-"), False
    else:  # the checkout or a copy of it: its HEAD and whether streammerge/ differs from it
        commit = _git("rev-parse", "--short", "HEAD")
        dirty = _tree_sha(SRC) != _committed_sha(commit)
    return {"source": SRC_REF, "source_dir": str(SRC), "commit": commit, "streammerge_dirty": dirty,
            "streammerge_sha256": _tree_sha(SRC)}


def disk_of(path: Path) -> str:
    """The block device and file system a path lives on (from /proc/mounts)."""
    path = path.resolve()
    best = ("?", "?", "")
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            dev, mnt, fs = line.split()[:3]
            if str(path).startswith(mnt) and len(mnt) >= len(best[2]):
                best = (dev, fs, mnt)
    except OSError:
        pass
    dev = best[0]
    rotational = Path(f"/sys/block/{Path(dev).name}/queue/rotational")
    kind = ""
    if rotational.is_file():
        kind = "virtio disk" if Path(dev).name.startswith("vd") else "disk"
    return f"{dev} ({best[1]}{', ' + kind if kind else ''})"


def machine() -> dict[str, Any]:
    """Facts recorded beside every figure."""
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    torch_version = subprocess.run([str(MAIN_PY), "-c", "import torch; print(torch.__version__)"],
                                   capture_output=True, text=True).stdout.strip()
    return {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / GIB, 1),
        "disk": disk_of(DATA), "data_dir": str(DATA), "kernel": platform.release(),
        "python": platform.python_version(), "torch": torch_version, "cuda": HAS_CUDA,
        **source_fingerprint(),
    }


def machine_line(m: dict[str, Any]) -> str:
    return (f"{m['cores']}-core CPU VM ({m['cpu']}), {m['memory_gib']} GiB RAM, {m['disk']}, "
            f"{'CUDA' if m['cuda'] else 'no GPU'}, {m['date'][:10]}, streammerge {m['commit']}"
            f"{'+dirty' if m['streammerge_dirty'] else ''}")


def peer_versions() -> dict[str, str]:
    """mergekit / transformers / peft / torch in the peers venv, transformers / peft in ours."""
    code = ("import importlib.metadata as m, json; print(json.dumps({p: m.version(p) for p in "
            "('mergekit', 'transformers', 'peft', 'torch') if __import__('importlib.util').util.find_spec(p)}))")
    out = {}
    for label, py in (("peers_venv", PEERS_BIN / "python"), ("main_venv", MAIN_PY)):
        try:
            out[label] = json.loads(subprocess.run([str(py), "-c", code], capture_output=True, text=True,
                                                   check=True).stdout)
        except (OSError, subprocess.CalledProcessError, json.JSONDecodeError):
            out[label] = {}
    return out


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# ---------------------------------------------------------------- inputs

def synthetic(*args: str) -> None:
    """Run tools/synthetic.py with the main venv."""
    subprocess.run([str(MAIN_PY), str(SRC / "tools" / "synthetic.py"), *args], check=True,
                   stdout=subprocess.DEVNULL)


def ensure_model(name: str, preset: str, layers: int | None = None) -> Path:
    """A synthetic bf16 base model under MODELS (generated once; a ``.complete`` marker guards reuse)."""
    out = MODELS / name
    if not (out / ".complete").is_file():
        shutil.rmtree(out, ignore_errors=True)
        extra = ["--layers", str(layers)] if layers is not None else []
        synthetic("model", "--preset", preset, *extra, "--out", str(out))
        (out / ".complete").touch()
    return out


def ensure_adapters(model: Path, count: int, rank: int = 16) -> list[Path]:
    """``count`` rank-``rank`` adapters (targets q/k/v/o/gate/up/down, seeds 1..count) of ``model``."""
    paths = []
    for seed in range(1, count + 1):
        out = MODELS / f"{model.name}-r{rank}-a{seed}"
        if not (out / ".complete").is_file():
            shutil.rmtree(out, ignore_errors=True)
            synthetic("adapter", "--model", str(model), "--out", str(out), "--rank", str(rank),
                      "--seed", str(seed), "--targets", ADAPTER_TARGETS)
            (out / ".complete").touch()
        paths.append(out)
    return paths


def ensure_finetunes(model: Path, count: int) -> list[Path]:
    """``count`` synthetic full fine-tunes of ``model`` (seeded noise on every 2-D tensor)."""
    paths = []
    for seed in range(1, count + 1):
        out = MODELS / f"{model.name}-ft{seed}"
        if not (out / ".complete").is_file():
            shutil.rmtree(out, ignore_errors=True)
            synthetic("finetune", "--model", str(model), "--out", str(out), "--seed", str(seed))
            (out / ".complete").touch()
        paths.append(out)
    return paths


def weight_files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*.safetensors") if p.is_file())


def tree_bytes(paths: Iterable[Path]) -> int:
    return sum(f.stat().st_size for p in paths for f in Path(p).rglob("*") if f.is_file())


def evict(paths: Iterable[Path]) -> None:
    """Drop the files under ``paths`` from the page cache (clean pages only; inputs are clean)."""
    for p in paths:
        files = [p] if Path(p).is_file() else [f for f in Path(p).rglob("*") if f.is_file()]
        for f in files:
            try:
                fd = os.open(f, os.O_RDONLY)
            except OSError:
                continue
            try:
                os.fdatasync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()


def fsync_tree(path: Path) -> float:
    """fsync ``path`` if it is a file, else every file under it (a peer that does not make its output durable);
    returns seconds."""
    start = time.perf_counter()
    path = Path(path)
    for f in [path] if path.is_file() else sorted(path.rglob("*")):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    return time.perf_counter() - start


# ---------------------------------------------------------------- the floor

def copy_floor(sources: Sequence[Path], dest: Path) -> float:
    """Seconds to read ``sources`` and write the same bytes under ``dest``, made durable.

    Plain ``readinto``/``write`` of 64 MiB chunks; every 256 MiB an ``fdatasync`` and
    ``POSIX_FADV_DONTNEED`` (what a flat-memory writer has to do), a final ``fsync``.
    """
    dest.mkdir(parents=True, exist_ok=True)
    buf = bytearray(COPY_CHUNK)
    view = memoryview(buf)
    start = time.perf_counter()
    for i, src in enumerate(sources):
        with open(src, "rb", buffering=0) as r, open(dest / f"{i:05d}-{src.name}", "wb", buffering=0) as w:
            unsynced = 0
            while n := r.readinto(buf):
                w.write(view[:n])
                unsynced += n
                if unsynced >= FLOOR_WRITEBACK:
                    os.fdatasync(w.fileno())
                    os.posix_fadvise(w.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
                    unsynced = 0
            os.fsync(w.fileno())
    return time.perf_counter() - start


def measure_floor(model: Path, warm: bool = False) -> dict[str, Any]:
    """One repetition of the floor on ``model``'s weight shards (cold cache unless ``warm``)."""
    files = weight_files(model)
    dest = SCRATCH / "floor"
    remove(dest)
    if not warm:
        evict(files)
    load = loadavg()
    seconds = copy_floor(files, dest)
    nbytes = sum(f.stat().st_size for f in files)
    remove(dest)
    return {"tool": "floor", "seconds": round(seconds, 3), "bytes": nbytes,
            "read_write_mib_s": round(nbytes / seconds / MIB, 1), "load_avg": load}


# ---------------------------------------------------------------- measured subprocesses

@dataclass
class Run:
    """One measured child process."""

    label: str
    command: list[str]
    rc: int
    wall_s: float
    cpu_s: float
    maxrss_mib: float
    sampled_peak_mib: float
    load_avg: list[float]
    log: str
    summary: dict[str, Any] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        return asdict(self)


def _sample_tree(pid: int, stop: threading.Event, peak: list[int], min_available_mib: float | None,
                 guard: list[str], interval: float = 0.05) -> None:
    try:
        root = psutil.Process(pid)
    except psutil.Error:
        return
    while not stop.is_set():
        if min_available_mib is not None and psutil.virtual_memory().available < min_available_mib * MIB:
            guard.append(f"stopped: available memory fell below {min_available_mib:.0f} MiB")
            for proc in [*root.children(recursive=True), root]:
                try:
                    proc.kill()
                except psutil.Error:
                    pass
            return
        try:
            total = root.memory_info().rss
            for child in root.children(recursive=True):
                try:
                    total += child.memory_info().rss
                except psutil.Error:
                    pass
            peak[0] = max(peak[0], total)
        except psutil.Error:
            return
        stop.wait(interval)


def run_measured(label: str, command: Sequence[str], log: Path, env: dict[str, str] | None = None,
                 cwd: Path | None = None, timeout: float | None = None,
                 min_available_mib: float | None = None) -> Run:
    """Run ``command`` as one child; wall time, CPU time, its ``ru_maxrss`` and a psutil-sampled tree peak.

    ``min_available_mib``: kill the child when the machine's available memory falls below it
    (a peer that loads a whole model must not push the shared machine into the OOM killer).
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    load = loadavg()
    # ru_maxrss survives exec: a child spawned (vfork/fork + exec) from this process starts with
    # our own high-water mark, which grows when we compare outputs.  GNU time forks the command
    # from a small process of its own and reports the command's true peak.
    maxrss_file = log.with_suffix(".maxrss")
    maxrss_file.unlink(missing_ok=True)
    wrapper = ["/usr/bin/time", "-f", "%M", "-o", str(maxrss_file)] if Path("/usr/bin/time").exists() else []
    with open(log, "wb") as out:
        start = time.perf_counter()
        proc = subprocess.Popen([*wrapper, *command], stdout=out, stderr=subprocess.STDOUT, cwd=cwd or SRC,
                                env={**os.environ, **(env or {})})
        stop, peak, guard = threading.Event(), [0], []
        sampler = threading.Thread(target=_sample_tree, args=(proc.pid, stop, peak, min_available_mib, guard),
                                   daemon=True)
        sampler.start()
        deadline = None if timeout is None else start + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if deadline is not None and time.perf_counter() > deadline:
                for child in psutil.Process(proc.pid).children(recursive=True):  # the command under GNU time
                    child.kill()
                proc.kill()
            time.sleep(0.02)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)  # wait4 reaped it; tell Popen
        stop.set()
        sampler.join()
    cpu = usage.ru_utime + usage.ru_stime
    maxrss_kib = usage.ru_maxrss
    try:
        maxrss_kib = int(maxrss_file.read_text().split()[-1])
    except (OSError, ValueError, IndexError):
        pass  # no GNU time (or the command was killed before it wrote): wait4's figure
    run = Run(label, list(command), proc.returncode, round(wall, 3), round(cpu, 2), round(maxrss_kib / 1024, 1),
              round(peak[0] / MIB, 1), load, str(log))
    if guard:
        run.summary["guard"] = guard[0]
    return run


def streammerge_command(base: Path, inputs: Sequence[tuple[str, Path]], method: str, out: Path | None,
                        params: Sequence[str] = (), subcommand: str = "merge") -> list[str]:
    """``python -m streammerge merge --base … --adapter … --method … --out … --no-progress``.

    On a CUDA machine merges go through ``cuda_peak.py`` (the same CLI, plus its GPU peak).
    """
    entry = ["-m", "streammerge"]
    if subcommand == "merge" and HAS_CUDA:
        entry = [str(REPO / "benchmarks" / "cuda_peak.py")]
    cmd = [str(MAIN_PY), *entry, subcommand, "--base", str(base)]
    for kind, path in inputs:
        cmd += [f"--{kind}", str(path)]
    cmd += ["--method", method]
    for p in params:
        cmd += ["--param", p]
    if out is not None:
        cmd += ["--out", str(out)]
    if subcommand == "merge":
        cmd.append("--no-progress")
    return cmd


def last_json_object(text: str) -> dict[str, Any]:
    """The last top-level JSON object printed (the CLI's summary), or {}."""
    end = text.rfind("}")
    while end != -1:
        start = text.rfind("\n{", 0, end)
        start = 0 if start == -1 and text.startswith("{") else start
        if start == -1:
            return {}
        try:
            return json.loads(text[start:end + 1])
        except json.JSONDecodeError:
            end = text.rfind("}", 0, start)
    return {}


def run_streammerge(label: str, base: Path, inputs: Sequence[tuple[str, Path]], method: str,
                    params: Sequence[str] = (), warm: bool = False, keep: bool = False,
                    env: dict[str, str] | None = None) -> Run:
    """One cold-cache streammerge merge into SCRATCH, measured; output deleted unless ``keep``."""
    out = SCRATCH / f"out-{label}"
    remove(out)
    if not warm:
        evict([base, *(p for _, p in inputs)])
    cmd = streammerge_command(base, inputs, method, out, params)
    run = run_measured(label, cmd, BENCH_OUT / "logs" / f"{label}.log", env=env)
    text = Path(run.log).read_text(errors="replace")
    run.summary = {k: v for k, v in last_json_object(text).items() if k != "method_stats"}
    for line in text.splitlines():
        if line.startswith("CUDA_PEAK "):
            run.summary["cuda_peak"] = json.loads(line.removeprefix("CUDA_PEAK "))
    if run.rc != 0:
        print(f"  !! {label} failed (rc {run.rc}); see {run.log}:\n{text[-2000:]}", file=sys.stderr)
    if not keep:
        remove(out)
    return run


def predicted_peak_mib(base: Path, inputs: Sequence[tuple[str, Path]], method: str,
                       params: Sequence[str] = ()) -> float | None:
    """``streammerge plan``'s predicted peak memory (parsed from its text), in MiB."""
    cmd = streammerge_command(base, inputs, method, None, params, subcommand="plan")
    text = subprocess.run(cmd, cwd=SRC, capture_output=True, text=True).stdout
    for line in text.splitlines():
        if "predicted peak memory" in line:
            value, unit = line.split("predicted peak memory", 1)[1].split()[:2]
            return round(float(value) * {"B": 1 / MIB, "KiB": 1 / 1024, "MiB": 1, "GiB": 1024}[unit.rstrip(",;")], 1)
    return None


# ---------------------------------------------------------------- results

def median(values: Iterable[float]) -> float:
    values = list(values)
    return round(statistics.median(values), 3) if values else float("nan")


def fmt_s(x: float | None) -> str:
    return "—" if x is None else f"{x:.1f} s" if x >= 10 else f"{x:.2f} s"


def fmt_mib(x: float | None) -> str:
    return "—" if x is None else f"{x / 1024:.2f} GiB" if x >= 1024 else f"{x:.0f} MiB"


def fmt_ratio(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}×"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def save_results(name: str, doc: dict[str, Any]) -> Path:
    """Write ``bench-out/<name>-<timestamp>.json`` and ``bench-out/<name>-latest.json``."""
    BENCH_OUT.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    text = json.dumps(doc, indent=2, default=str) + "\n"
    path = BENCH_OUT / f"{name}-{stamp}.json"
    path.write_text(text)
    (BENCH_OUT / f"{name}-latest.json").write_text(text)
    return path


def invocation() -> str:
    """The command line that produced a result, as run from the repository root."""
    return " ".join([".venv/bin/python", Path(sys.argv[0]).resolve().relative_to(REPO).as_posix(), *sys.argv[1:]])
