#!/usr/bin/env bash
# The GPU benchmark kit: SD 1.5-sized weights (or your checkpoint) -> ONNX -> FP16 TensorRT engines -> served by
# Triton, measured against diffusers PyTorch FP16 (SDPA, and torch.compile) on the same GPU in the same run;
# writes the "gpu" section of benchmarks/RESULTS.md.
#
#   benchmarks/gpu.sh                      # random SD 1.5-shaped weights (no checkpoint needed)
#   benchmarks/gpu.sh /models/sd15         # a diffusers folder of yours
#   benchmarks/gpu.sh --baseline-only      # diffusers alone: any machine with PyTorch (CUDA) and diffusers
#
# Runs inside the docker/ image (tritonserver, TensorRT, CUDA torch) or in a plain venv on a GPU host with
# `pip install -e '.[gpu]'` and SDTRT_TRITONSERVER pointing at NVIDIA's tritonserver. Work files go to
# $SDTRT_BENCH_DIR (default bench-work/); the interpreter is $PYTHON (default python3).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=${SDTRT_BENCH_DIR:-$ROOT/bench-work}
PY=${PYTHON:-python3}
BASELINE_ONLY=()
MODEL=""
EXTRA=()
for arg in "$@"; do
  case "$arg" in
    --baseline-only) BASELINE_ONLY=(--baseline-only) ;;
    -h|--help) sed -n '2,13p' "${BASH_SOURCE[0]}"; exit 0 ;;
    --*) EXTRA+=("$arg") ;;   # passed on to gpu_bench.py (e.g. --repeats=3, --compile-mode=none)
    *) MODEL=$arg ;;
  esac
done
command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1 || { echo "gpu.sh: no NVIDIA GPU here (nvidia-smi failed)" >&2; exit 1; }
command -v "$PY" >/dev/null || { echo "gpu.sh: $PY not found; set PYTHON=/path/to/python" >&2; exit 1; }
mkdir -p "$WORK"
MODEL=${MODEL:-$WORK/sd15-shaped}   # gpu_bench.py builds SD 1.5-shaped random weights there when it is missing
if [ ${#BASELINE_ONLY[@]} -gt 0 ]; then
  exec "$PY" "$ROOT/benchmarks/gpu_bench.py" --model "$MODEL" --baseline-only "${EXTRA[@]}"
fi
[ -f "$MODEL/model_index.json" ] || "$PY" -c "import sys; from sdtrt.pipeline.default_model import build_default_model as b; b(sys.argv[1], size='sd15')" "$MODEL"
# Engines with a 256-1024 px profile (opt 512) and batch 1-4; a re-run with the same inputs is a no-op.
"$PY" -m sdtrt export "$MODEL" --out "$WORK/repo" --format trt --min-size 256 --max-size 1024 --max-batch 4
exec "$PY" "$ROOT/benchmarks/gpu_bench.py" --model "$MODEL" --repo "$WORK/repo" "${EXTRA[@]}"
