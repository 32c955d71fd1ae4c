#!/usr/bin/env bash
# Set up everything and run the test suite. Extra arguments go to pytest (e.g. -k parity).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
"$ROOT/scripts/setup.sh"
# The Gradio page is tested in Debian's headless chromium; install it when we can (root with apt-get).
if ! command -v chromium >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "test: installing Debian's chromium for the web UI test"
  apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; } \
    || echo "test: could not install chromium; the web UI test will be skipped" >&2
fi
VENV=${SDTRT_VENV:-$ROOT/.venv}
export PATH="$VENV/bin:$PATH" HF_HUB_OFFLINE=1
# The slowest tests are listed so that a run over the 15-minute budget says where the time went.
exec python -m pytest tests --durations=30 "$@"
