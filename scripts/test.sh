#!/usr/bin/env bash
# Set up everything and run the test suite. Extra arguments go to pytest (e.g. -k parity).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
"$ROOT/scripts/setup.sh"
VENV=${SDTRT_VENV:-$ROOT/.venv}
export PATH="$VENV/bin:$PATH" HF_HUB_OFFLINE=1
exec python -m pytest tests "$@"
