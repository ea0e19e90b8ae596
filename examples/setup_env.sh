#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and build rannc_py into it.
# Sourced by examples/demo.sh and tests/run.sh; safe to run again: it installs
# only when pyproject.toml changed and rebuilds the C++ extension when sources change.
# The dependencies and their pins are those of pyproject.toml (with its "test" extra).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${RANNC_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment in $VENV"
  "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.rannc_reqs"
STAMP_TEXT="$(cat "$ROOT/pyproject.toml")"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$STAMP_TEXT" ]; then
  echo "[setup] installing rannc_py and its dependencies (torch CPU, MPI from PyPI, test tools)"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -c "import tomllib" 2>/dev/null || "$VENV/bin/python" -m pip install -q tomli
  # The build requirements first: the editable install builds in this environment
  # (no isolation), so the pinned torch is resolved once, with everything else.
  mapfile -t BUILD_REQS < <("$VENV/bin/python" - "$ROOT/pyproject.toml" <<'PY'
import sys
try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib
with open(sys.argv[1], "rb") as f:
    print("\n".join(tomllib.load(f)["build-system"]["requires"]))
PY
)
  "$VENV/bin/python" -m pip install -q "${BUILD_REQS[@]}"
  (cd "$ROOT" && "$VENV/bin/python" -m pip install -q --no-build-isolation -e ".[test]")
  echo "$STAMP_TEXT" > "$STAMP"
fi
echo "[setup] building rannc_py._core"
# The lock keeps two commands started at once (demo and tests) from building over each other.
if command -v flock >/dev/null 2>&1; then
  (cd "$ROOT" && flock "$VENV/.build.lock" "$VENV/bin/python" setup.py -q build_ext --inplace > /dev/null)
else
  (cd "$ROOT" && "$VENV/bin/python" setup.py -q build_ext --inplace > /dev/null)
fi

export PATH="$VENV/bin:$PATH"
export RANNC_VENV="$VENV"
