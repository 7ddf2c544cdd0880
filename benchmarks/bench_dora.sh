#!/bin/bash
# DoRA adapters merged into a synthetic base (default: the 8b preset): peak RSS and wall.
#
#   BASE=/tmp/bench/models/8b N=2 WORK=/tmp/bench/dora benchmarks/bench_dora.sh
#
# Generates N rank-16 DoRA adapters on all 7 projections (tools/synthetic.py adapter --dora: real PEFT
# format, use_dora + lora_magnitude_vector; reads the base once per adapter), evicts base and adapters
# from the page cache, merges them with Task Arithmetic under /usr/bin/time -v, verifies the output and
# deletes it (the 8b output is 15 GiB).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
BASE=${BASE:-${STREAMMERGE_BENCH_DATA:-/tmp/bench}/models/8b}
N=${N:-2}
WORK=${WORK:-${STREAMMERGE_BENCH_DATA:-/tmp/bench}/dora}
PY=${STREAMMERGE_BENCH_PYTHON:-$REPO/.venv/bin/python}
test -f "$BASE/.complete" || test -f "$BASE/model.safetensors.index.json"
cd "$REPO"
export PYTHONPATH=$REPO
mkdir -p "$WORK"
ADAPTERS=()
for i in $(seq 1 "$N"); do
  A=$WORK/$(basename "$BASE")-dora$i
  if [ ! -f "$A/.complete" ]; then
    rm -rf "$A"
    /usr/bin/time -f "generate $A: %e s, %M KiB" "$PY" tools/synthetic.py adapter --model "$BASE" --out "$A" \
      --rank 16 --seed "$i" --dora
    touch "$A/.complete"
  fi
  ADAPTERS+=(--adapter "$A")
done
"$PY" -m streammerge plan --base "$BASE" "${ADAPTERS[@]}" --method task_arithmetic --device cpu | grep -E "memory|merge:|write:"
"$PY" - "$BASE" "${ADAPTERS[@]}" <<'PYEOF'
import os, sys
from pathlib import Path
for p in [a for a in sys.argv[1:] if a != "--adapter"]:
    for f in Path(p).rglob("*.safetensors"):
        fd = os.open(f, os.O_RDONLY); os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED); os.close(fd)
PYEOF
OUT=$WORK/out
NAME=$(basename "$BASE")
echo "load before: $(cat /proc/loadavg)"
rm -rf "$OUT"
/usr/bin/time -v "$PY" -m streammerge merge --base "$BASE" "${ADAPTERS[@]}" --method task_arithmetic --out "$OUT" \
  --device cpu --no-progress > "$WORK/dora-$NAME.json" 2> "$WORK/dora-$NAME.time"
echo "load after: $(cat /proc/loadavg)"
grep -E "Elapsed|Maximum resident|User time|System time|Percent of CPU" "$WORK/dora-$NAME.time"
grep -E '"seconds"|peak_rss_mib|peak_anon|tensors_merged|bytes_written' "$WORK/dora-$NAME.json"
"$PY" -m streammerge verify "$OUT" | tail -1
rm -rf "$OUT"
