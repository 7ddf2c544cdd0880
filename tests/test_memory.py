"""Peak memory is bounded by one tensor's working set and does not grow with the number of layers.

Each merge runs in a fresh subprocess that reports its own true peak (``ru_maxrss``) at exit.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from tools.synthetic import Preset, write_adapter, write_model

REPO = Path(__file__).resolve().parent.parent
# 12.6M parameters (25 MB in bf16) per layer; the largest tensor is 2.9M elements.
PRESET = Preset("llama", 1024, 2816, 1, 8, 8, 4096, tied=False)
MiB = 2**20
WORKING_SET_BUDGET = 96 * MiB  # above the 2-layer run; ~6x smaller than the 24-layer model

_PEAK = """
import json, resource, sys
from streammerge.cli import main
code = main(sys.argv[1:])
print(json.dumps({"code": code, "ru_maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def _merge_peak(base: Path, adapters: list[Path], out: Path) -> tuple[int, dict]:
    args = ["merge", "--base", str(base), "--out", str(out), "--no-progress", "--device", "cpu"]
    for a in adapters:
        args += ["--adapter", str(a)]
    proc = subprocess.run([sys.executable, "-c", _PEAK, *args], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    return json.loads(lines[-1])["ru_maxrss_kib"] * 1024, json.loads("\n".join(lines[:-1]))


@pytest.mark.parametrize("method_kind", ["lora"])
def test_peak_rss_is_flat_in_layers(tmp_path, method_kind):
    peaks = {}
    sizes = {}
    for layers in (2, 24):
        base = write_model(tmp_path / f"base{layers}", replace(PRESET, layers=layers), "BF16",
                           max_shard_size=200 * 10**6)
        adapters = [write_adapter(base, tmp_path / f"a{layers}_{i}", rank=16, seed=i) for i in range(3)]
        peaks[layers], summary = _merge_peak(base, adapters, tmp_path / f"out{layers}")
        sizes[layers] = summary["bytes_written"]
    assert sizes[24] > 6 * WORKING_SET_BUDGET, "the big model must be many times the budget"
    growth = peaks[24] - peaks[2]
    print(f"peak RSS: 2 layers {peaks[2] / MiB:.0f} MiB, 24 layers {peaks[24] / MiB:.0f} MiB; model {sizes[24] / MiB:.0f} MiB")
    assert growth < WORKING_SET_BUDGET, (
        f"peak RSS grew by {growth / MiB:.0f} MiB from 2 to 24 layers "
        f"({peaks[2] / MiB:.0f} -> {peaks[24] / MiB:.0f} MiB) for a {sizes[24] / MiB:.0f} MiB model")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="anonymous RSS comes from /proc (Linux)")
def test_monitor_separates_anonymous_memory_from_mapped_file_pages(tmp_path):
    import mmap

    from streammerge.execution.memory import PeakMemoryMonitor

    path = tmp_path / "pages.bin"
    path.write_bytes(b"\1" * (96 * MiB))
    with PeakMemoryMonitor() as mapped, open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        start_rss, start_anon = mapped.peak_rss, mapped.peak_anon_rss
        assert sum(m[i] for i in range(0, len(m), 4096)) == len(m) // 4096  # fault every page in
        mapped.sample()
    assert mapped.peak_rss - start_rss > 80 * MiB
    assert mapped.peak_anon_rss - start_anon < 16 * MiB

    with PeakMemoryMonitor() as allocated:
        start_anon = allocated.peak_anon_rss
        buffer = bytearray(96 * MiB)  # zero-filled pages: every one is touched
        allocated.sample()
        del buffer
    assert allocated.peak_anon_rss - start_anon > 80 * MiB
