#!/usr/bin/env bash
# The GPU benchmark kit: SD 1.5-sized weights (or your checkpoint) -> ONNX -> FP16 TensorRT engines -> served by
# Triton, measured against diffusers PyTorch FP16 on the same GPU in the same run; writes benchmarks/RESULTS.md.
#
#   benchmarks/gpu.sh                      # random SD 1.5-shaped weights (no checkpoint needed)
#   benchmarks/gpu.sh /models/sd15         # a diffusers folder of yours
#   benchmarks/gpu.sh --baseline-only      # diffusers FP16 alone: a machine with PyTorch but no TensorRT
#
# Run it inside the docker/ image (it has tritonserver and TensorRT), or anywhere with `pip install 'sdtrt[gpu]'`
# and SDTRT_TRITONSERVER pointing at NVIDIA's tritonserver. Work files go to $SDTRT_BENCH_DIR (default bench-work/).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=${SDTRT_BENCH_DIR:-$ROOT/bench-work}
BASELINE_ONLY=""
MODEL=""
for arg in "$@"; do
  case "$arg" in
    --baseline-only) BASELINE_ONLY=1 ;;
    *) MODEL=$arg ;;
  esac
done
command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null || { echo "gpu.sh: no NVIDIA GPU here" >&2; exit 1; }
mkdir -p "$WORK"
if [ -z "$MODEL" ]; then
  MODEL=$WORK/sd15-shaped
  [ -f "$MODEL/model_index.json" ] || sdtrt init-default --size sd15 --out "$MODEL"
fi
if [ -n "$BASELINE_ONLY" ]; then
  exec python "$ROOT/benchmarks/gpu_bench.py" --model "$MODEL" --baseline-only
fi
# Engines with a 256-1024 px profile (opt 512) and batch 1-4; the timing cache makes re-runs quick.
[ -f "$WORK/repo/trt_engines.json" ] || \
  sdtrt export "$MODEL" --out "$WORK/repo" --format trt --min-size 256 --max-size 1024 --max-batch 4
exec python "$ROOT/benchmarks/gpu_bench.py" --model "$MODEL" --repo "$WORK/repo"
