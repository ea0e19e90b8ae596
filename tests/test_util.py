"""The shared helpers at the bottom of the package."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from rannc_py._util import atomic_write, format_bytes, format_seconds, grid_shape
from rannc_py.errors import ConfigError


def test_atomic_write_replaces_whole_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "plan.json"
    atomic_write(target, "old")
    atomic_write(target, b"new")
    assert target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json"]


def test_atomic_write_gives_the_permissions_of_any_new_file(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "a", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o644


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path: Path) -> None:
    target = tmp_path / "a"
    atomic_write(target, "old")
    with pytest.raises(TypeError):
        atomic_write(target, 5)  # type: ignore[arg-type]
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_units_and_grid() -> None:
    assert format_bytes(1536) == "1.5 KiB" and format_bytes(3 * 2**40) == "3 TiB"
    assert format_seconds(0.0856) == "85.6 ms" and format_seconds(2e-9) == "2 ns"
    assert grid_shape(16) == (4, 2, 2) and grid_shape(1) == (1,)
    with pytest.raises(ConfigError):
        grid_shape(0)
