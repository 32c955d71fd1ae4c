#!/usr/bin/env bash
# Set up, build the default model, export it, start tritonserver, send one prompt, save the PNG (with A1111
# infotext), stop the server.      scripts/demo.sh ["your prompt"]
# Ports: SDTRT_HTTP_PORT (8000), SDTRT_GRPC_PORT (8001), SDTRT_METRICS_PORT (8002).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
"$ROOT/scripts/setup.sh"
VENV=${SDTRT_VENV:-$ROOT/.venv}
export PATH="$VENV/bin:$PATH" HF_HUB_OFFLINE=1
PROMPT=${1:-"a large red circle in the center on a blue background"}
HTTP=${SDTRT_HTTP_PORT:-8000} GRPC=${SDTRT_GRPC_PORT:-8001} METRICS=${SDTRT_METRICS_PORT:-8002}

# The default model draws coloured shapes (64x64); rebuilt every time (seconds, byte-identical, so the export
# below is then a no-op) so that an older folder never lingers.
sdtrt init-default --out models/default
sdtrt export models/default --out repos/default

mkdir -p logs
sdtrt serve -m repos/default --http-port "$HTTP" --grpc-port "$GRPC" --metrics-port "$METRICS" \
  --log-file logs/tritonserver.log >logs/serve.out 2>&1 &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null; wait $SERVER 2>/dev/null; tail -n 1 logs/serve.out' EXIT
echo "starting tritonserver (log: logs/tritonserver.log)"
until grep -q "^ready:" logs/serve.out; do
  kill -0 $SERVER 2>/dev/null || { cat logs/serve.out; echo "demo: the server did not start" >&2; exit 1; }
  sleep 0.5
done
sdtrt txt2img "$PROMPT" --negative-prompt "blurry, low quality" --steps 20 --sampler "Euler a" \
  --cfg-scale 7 --seed 42 --url "localhost:$GRPC" --out outputs/
