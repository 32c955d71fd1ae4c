#!/usr/bin/env bash
# Set up, build the default model, export it, and turn a prompt into a PNG (with A1111 infotext).
#   scripts/demo.sh ["your prompt"]
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
"$ROOT/scripts/setup.sh"
VENV=${SDTRT_VENV:-$ROOT/.venv}
export PATH="$VENV/bin:$PATH" HF_HUB_OFFLINE=1
PROMPT=${1:-"a lighthouse on a cliff at dawn, oil painting"}

[ -f models/default/model_index.json ] || sdtrt init-default --out models/default
[ -f repos/default/sdtrt_spec.json ] || sdtrt export models/default --out repos/default
sdtrt txt2img "$PROMPT" --negative-prompt "blurry, low quality" --steps 20 --sampler "Euler a" \
  --cfg-scale 7 --seed 42 --local repos/default --out outputs/
