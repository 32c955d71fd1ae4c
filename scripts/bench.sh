#!/usr/bin/env bash
# Set up everything and run the CPU benchmark suite on this machine; each benchmark rewrites its own section of
# benchmarks/RESULTS.md (naming this CPU) and the sweep writes benchmarks/perf_sweep.png. GPU figures come from
# benchmarks/gpu.sh on a GPU box.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
"$ROOT/scripts/setup.sh"
VENV=${SDTRT_VENV:-$ROOT/.venv}
"$VENV/bin/pip" install --quiet --disable-pip-version-check -e "$ROOT[bench]" 2> >(grep -v "is ignored: it is neither" >&2)
export PATH="$VENV/bin:$PATH" HF_HUB_OFFLINE=1
for bench in cpu_bench batching_bench lora_bench cold_start perf_sweep; do
  echo "bench: $bench"
  python "benchmarks/$bench.py"
done
