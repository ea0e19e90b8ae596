"""Build rannc_py and its C++ extension ``rannc_py._core`` against MPI.

MPI comes from whatever ``mpicxx`` is found: ``$MPICXX`` if set, else the one
next to the running Python (the ``mpich`` wheel from PyPI puts it there), else
the first on ``PATH``. Compile and link flags are read from ``mpicxx -show``
(MPICH, Intel MPI) or ``mpicxx -showme`` (Open MPI), so a cluster's system MPI
works the same way as the wheel.

Everything else about the package (its metadata, version, dependencies and
tool settings) is in ``pyproject.toml``. ``pip install .`` builds it in an
isolated environment with the build requirements listed there (``mpich``
provides ``mpicxx``); with a cluster's MPI, install against it::

    MPICXX=$(which mpicxx) pip install --no-build-isolation .

The extension finds ``libmpi`` through the wrapper's library folders, and
through ``$ORIGIN/../../..`` (the environment's ``lib/``, where the ``mpich``
wheel puts it) when it was built in an isolated environment that is gone.
"""

from __future__ import annotations

import glob
import os
import shlex
import shutil
import subprocess
import sys

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup


def find_mpicxx() -> str:
    explicit = os.environ.get("MPICXX")
    if explicit:
        return explicit
    beside_python = os.path.join(os.path.dirname(sys.executable), "mpicxx")
    if os.path.exists(beside_python):
        return beside_python
    on_path = shutil.which("mpicxx")
    if on_path:
        return on_path
    raise SystemExit(
        "rannc_py needs MPI to build: no mpicxx found. Install it with "
        "`pip install mpi4py mpich`, or point MPICXX at your system's mpicxx."
    )


def mpi_flags(mpicxx: str) -> tuple[list[str], list[str], list[str], list[str]]:
    """Return (include_dirs, library_dirs, libraries, extra_link_args) from the wrapper."""
    words: list[str] = []
    for query in ("-show", "-showme"):
        try:
            out = subprocess.run([mpicxx, query], capture_output=True, text=True, check=True).stdout
        except (OSError, subprocess.CalledProcessError):
            continue
        if out.strip():
            words = shlex.split(out)[1:]  # drop the underlying compiler's name
            break
    if not words:
        raise SystemExit(f"could not read compile flags from {mpicxx} (tried -show and -showme)")
    inc, libdirs, libs, link = [], [], [], []
    for w in words:
        if w.startswith("-I"):
            inc.append(w[2:])
        elif w.startswith("-L"):
            libdirs.append(w[2:])
        elif w.startswith("-l"):
            libs.append(w[2:])
        elif w.startswith("-Wl,") or w == "-pthread":
            link.append(w)
    return inc, libdirs, libs, link


class ParallelBuildExt(build_ext):
    """Compile the extension's sources on all cores."""

    def finalize_options(self) -> None:
        super().finalize_options()
        if not self.parallel:
            self.parallel = os.cpu_count() or 1


def sources() -> list[str]:
    # Every .cpp under csrc/ except the standalone C++ tests (built by tests/).
    files = glob.glob("csrc/**/*.cpp", recursive=True)
    return sorted(f for f in files if "/tests/" not in f.replace(os.sep, "/"))


inc, libdirs, libs, link = mpi_flags(find_mpicxx())

core = Pybind11Extension(
    "rannc_py._core",
    sources(),
    include_dirs=["csrc", *inc],
    library_dirs=libdirs,
    libraries=libs,
    runtime_library_dirs=libdirs,
    extra_compile_args=["-O3", "-pthread", "-fvisibility=hidden"],
    # $ORIGIN/../../..: <env>/lib from <env>/lib/pythonX.Y/site-packages/rannc_py/, where the mpich wheel
    # installs libmpi, for a build whose wrapper lived in a temporary isolated environment.
    extra_link_args=["-pthread", "-Wl,-rpath,$ORIGIN/../../..", *link],
    cxx_std=17,
)

setup(
    ext_modules=[core],
    cmdclass={"build_ext": ParallelBuildExt},
    zip_safe=False,
)
