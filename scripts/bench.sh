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
# The half-width SD 1.5 model at 256 px and 10 steps: SD-shaped, and minutes rather than an hour on 2 cores.
while read -r bench args; do
  echo "bench: $bench $args"
  # shellcheck disable=SC2086
  python "benchmarks/$bench.py" $args
done <<'RUNS'
cpu_bench --model tiny --size 256 --steps 20
cpu_bench --model half --size 256 --steps 20 --repeats 2 --engines auto:fp32,auto:bf16
overhead_trace --model tiny
overhead_trace --model half --size 256 --steps 10 --repeats 2
batching_bench
lora_bench
cold_start
perf_sweep
RUNS
