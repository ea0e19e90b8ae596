"""Small helpers every layer may use: the measuring clock, a median timer, the
cache folder, atomic file writes, readable units and the most cubic grid.

This module is the bottom layer of the package with ``rannc_py.errors``: it
imports only the standard library, torch and the errors, never another part
of rannc_py (the import-linter contract in ``pyproject.toml`` checks it).
"""

from __future__ import annotations

import os
import secrets
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from rannc_py.errors import ConfigError


def clock() -> float:
    """Seconds on the measuring clock: this process's CPU time with one torch thread (other
    work descheduling it then does not pass for a slow device, and get cached), else the wall clock."""
    return time.process_time() if torch.get_num_threads() == 1 else time.perf_counter()


def median_time(fn: Callable[[], Any], repeats: int = 5) -> float:
    """Median seconds (:func:`clock`) of ``repeats`` calls of ``fn`` after one warm-up call."""
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return statistics.median(times)


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity; ``os.cpu_count()`` where that is unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def cache_dir() -> Path:
    """The on-disk cache folder: ``$RANNC_CACHE_DIR`` or ``~/.cache/rannc_py`` (created)."""
    d = Path(os.environ.get("RANNC_CACHE_DIR") or Path.home() / ".cache" / "rannc_py")
    d.mkdir(parents=True, exist_ok=True)
    return d


def atomic_write(path: str | os.PathLike[str], data: str | bytes) -> None:
    """Write ``data`` to ``path`` so that a reader sees the old file or the whole new one.

    The data goes to a temporary file in the same folder (so the rename
    cannot cross file systems), is flushed to disk, and replaces ``path``
    with one ``os.replace``; concurrent writers of one path never leave half
    a file, and a failed write leaves no temporary behind.
    """
    path = Path(path)
    # A fresh name opened exclusively (not mkstemp, whose 0600 mode would stick to the file): the
    # file gets the permissions any new file of this process gets.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def format_bytes(n: float) -> str:
    """``n`` bytes in the largest binary unit that keeps it at or above 1 (e.g. ``"15.4 MiB"``)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.4g} {unit}"
        n /= 1024
    return f"{n:.4g} TiB"


def format_seconds(t: float) -> str:
    """``t`` seconds in s, ms, us or ns (e.g. ``"85.6 ms"``)."""
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if t >= scale:
            return f"{t / scale:.3g} {unit}"
    return f"{t * 1e9:.3g} ns"


def grid_shape(cells: int, ndims: int = 3) -> tuple[int, ...]:
    """The most nearly cubic grid of at most ``ndims`` dimensions with ``cells`` cells.

    Minimises the longest side, then prefers more sides; sides are in
    descending order and sides of 1 are dropped (8 gives ``(2, 2, 2)``, 6
    gives ``(3, 2)``, 7 gives ``(7,)``, 1 gives ``(1,)``).

    Raises:
        ConfigError: ``cells`` or ``ndims`` is below 1.
    """
    if cells < 1 or ndims < 1:
        raise ConfigError(f"grid_shape needs cells >= 1 and ndims >= 1, got {cells} and {ndims}")
    best: tuple[int, ...] = (cells,)
    best_key = (cells, 1)

    def search(left: int, dims_left: int, lo: int, acc: tuple[int, ...]) -> None:
        nonlocal best, best_key
        if dims_left == 1:
            shape = tuple(sorted((*acc, left), reverse=True))
            key = (shape[0], -len([d for d in shape if d > 1]))
            if key < best_key:
                best, best_key = shape, key
            return
        d = lo
        while d * d <= left:
            if left % d == 0:
                search(left // d, dims_left - 1, d, (*acc, d))
            d += 1
        search(left, 1, lo, acc)

    search(cells, ndims, 2, ())
    shape = tuple(d for d in best if d > 1)
    return shape or (1,)
