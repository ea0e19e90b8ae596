#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and build rannc_py into it.
# Sourced by examples/demo.sh and tests/run.sh; safe to run again: it only
# installs what is missing and rebuilds the C++ extension when sources change.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${RANNC_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"

# ruff and mypy are the style checks the tests run (tests/test_lint.py).
# torch is pinned: `pip install torch==2.13.0` resolves to the CPU build here;
# an unpinned torch would pull gigabytes of CUDA wheels. transformers is pinned
# because the tests build its models from configs and its internals move fast.
RUNTIME_REQS=(torch==2.13.0 numpy networkx "mpi4py>=4" mpich pybind11 tqdm matplotlib)
TEST_REQS=(pytest pytest-timeout hypothesis transformers==5.23.0 ruff==0.17.6 mypy==2.4.1)
STAMP_TEXT="${RUNTIME_REQS[*]} ${TEST_REQS[*]}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment in $VENV"
  "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.rannc_reqs"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$STAMP_TEXT" ]; then
  echo "[setup] installing dependencies (torch CPU, MPI from PyPI, test tools)"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q "${RUNTIME_REQS[@]}"
  "$VENV/bin/python" -m pip install -q "${TEST_REQS[@]}"
  echo "$STAMP_TEXT" > "$STAMP"
fi
if ! "$VENV/bin/python" -c "import rannc_py" 2>/dev/null || [ ! -f "$VENV/.rannc_editable" ]; then
  echo "[setup] installing rannc_py (editable, no build isolation so torch is not re-resolved)"
  (cd "$ROOT" && "$VENV/bin/python" -m pip install -q --no-build-isolation --no-deps -e .)
  touch "$VENV/.rannc_editable"
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
