"""``python benchmarks/cuda_peak.py merge …``: the streammerge CLI, then its CUDA peak memory.

Run from the directory holding the ``streammerge`` package under test.  Used by the benchmarks instead of ``python -m streammerge`` when torch sees a GPU, because
the CLI's summary reports host RSS only.  Prints one line ``CUDA_PEAK {json}`` to stderr.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.getcwd())  # the benchmarks run it from the sources under test

import torch  # noqa: E402

from streammerge.cli import main  # noqa: E402

if __name__ == "__main__":
    code = main(sys.argv[1:])
    if torch.cuda.is_available():
        peak = {"allocated_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1),
                "reserved_mib": round(torch.cuda.max_memory_reserved() / 2**20, 1),
                "device": torch.cuda.get_device_name()}
        print("CUDA_PEAK " + json.dumps(peak), file=sys.stderr)
    sys.exit(code)
