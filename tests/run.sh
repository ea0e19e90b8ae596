#!/usr/bin/env bash
# Set up everything on a fresh machine and run the whole test suite.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# The SVE kernels are tested by cross-compiling with clang and running under
# qemu-aarch64; install those tools where we can (as root with apt), otherwise
# those tests skip and say why.
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  if ! command -v qemu-aarch64 >/dev/null 2>&1 || ! command -v clang++ >/dev/null 2>&1 \
     || [ ! -d /usr/aarch64-linux-gnu ]; then
    echo "[setup] installing clang, aarch64 sysroot and qemu-user for the SVE tests"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        clang g++-aarch64-linux-gnu qemu-user > /dev/null) \
      || echo "[setup] could not install the SVE toolchain; SVE tests will skip"
  fi
fi

source "$ROOT/examples/setup_env.sh"
cd "$ROOT"
export OMP_NUM_THREADS=1
exec "$VENV/bin/python" -m pytest -q tests "$@"
