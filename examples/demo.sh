#!/usr/bin/env bash
# The demo, from a fresh checkout: set up the virtual environment (PyTorch CPU,
# MPI from PyPI), build rannc_py, then train a GPT on 4 MPI ranks that
# rannc_py splits into pipeline stages with data-parallel replicas.
# Extra arguments go to examples/demo.py (e.g. --steps 50, --out folder);
# outputs go to out/demo/ by default.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=examples/setup_env.sh
source "$ROOT/examples/setup_env.sh"
cd "$ROOT"
# One thread per rank: 4 ranks share the machine's cores.
export OMP_NUM_THREADS=1
echo "[demo] training a GPT on 4 MPI ranks"
start=$SECONDS
"$RANNC_VENV/bin/mpiexec" -n 4 "$RANNC_VENV/bin/python" examples/demo.py "$@"
echo "[demo] training took $((SECONDS - start)) s"
