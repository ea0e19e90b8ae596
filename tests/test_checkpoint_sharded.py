"""Checkpoints of sharded optimizer state: each replica writes its shard, any layout and level reads it.

tests/mpi_scripts/shard_checkpoint.py writes a checkpoint on 4 ranks at dp4,
sharding level 1, after 3 steps (each rank's file holds exactly the state
its optimizer keeps), then resumes it at pp2 x dp2 level 0, dp2 level 2,
dp4 level 1 and replicas [1, 3] level 2, before or after the first call;
2 more steps match the eager run that never stopped (losses and parameters,
fp32 rtol 1e-5), and a checkpoint saved at dp2 or [1, 3] level 2 loads back
exactly. A sharded save killed part-way leaves the previous checkpoint.
"""

from __future__ import annotations

import filecmp
import shutil
from pathlib import Path

import pytest
import torch
from mpi_launch import REPO, run_mpi
from safetensors.torch import save_file

from rannc_py.errors import ConfigError
from rannc_py.runtime.checkpoint import KILL_ENV, read_index, read_tensors

SCRIPT = REPO / "tests/mpi_scripts/shard_checkpoint.py"


def test_a_range_is_read_from_the_shards_that_overlap_it(tmp_path: Path) -> None:
    full = torch.arange(24.0).reshape(4, 6)
    save_file({"a": full.reshape(-1)[:10].clone(), "w": full}, str(tmp_path / "r0.safetensors"))
    save_file({"b": full.reshape(-1)[10:].clone()}, str(tmp_path / "r1.safetensors"))
    split = {"shape": [4, 6], "dtype": "float32",
             "shards": [{"file": "r1.safetensors", "key": "b", "slice": [10, 24]},
                        {"file": "r0.safetensors", "key": "a", "slice": [0, 10]}]}
    whole = {"shape": [4, 6], "dtype": "float32", "shards": [{"file": "r0.safetensors", "key": "w", "slice": [0, 24]}]}
    got = read_tensors(tmp_path, {"s": split, "w": whole, "t": split, "n": whole},
                       ranges={"s": (7, 13), "w": (7, 13), "t": (10, 24), "n": (5, 5)})
    flat = full.reshape(-1)
    for name, (lo, hi) in {"s": (7, 13), "w": (7, 13), "t": (10, 24), "n": (5, 5)}.items():
        assert torch.equal(got[name], flat[lo:hi]), name
    assert torch.equal(read_tensors(tmp_path, {"s": split})["s"], full)  # no range: the whole, shaped
    with pytest.raises(ConfigError, match="cover 3 of 6 elements"):
        read_tensors(tmp_path, {"s": {**split, "shards": split["shards"][1:]}}, ranges={"s": (7, 13)})


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint written by 4 ranks at dp4, sharding level 1, after 3 steps."""
    ck = tmp_path_factory.mktemp("sharded") / "ck"
    run_mpi(4, SCRIPT, "write", str(ck), timeout=300)
    return ck


def test_every_replica_writes_its_shard(written: Path) -> None:
    index = read_index(written)
    files = {sh["file"] for st in index["optimizer"]["state"].values() for rec in st.values()
             for sh in rec.get("shards", [])}
    assert files == {f"rank{r:05d}.safetensors" for r in range(4)}
    assert index["layout"] == [4]


@pytest.mark.parametrize(("ranks", "layout", "level", "when", "again"), [
    (4, "p2_r2x2_m2_1f1b", 0, "before", False),  # pp2 x dp2 unsharded: whole parameters from the shards
    (2, "p1_r2_m2_1f1b", 2, "after", True),  # dp2 level 2: other piece boundaries, loaded after the first call
    (4, "p1_r4_m1_1f1b", 1, "after", False),  # the writer's layout
    (4, "p2_r1x3_m2_1f1b", 2, "before", True),  # replicas [1, 3] level 2
])
def test_resume_on_any_layout_and_level(written: Path, ranks: int, layout: str, level: int, when: str,
                                        again: bool) -> None:
    out = run_mpi(ranks, SCRIPT, "resume", str(written), layout, str(level), when, *["again"] * again, timeout=600)
    assert out.stdout.count(f"resumed {layout} level {level} {when}") == ranks


@pytest.mark.parametrize(("rank", "point"), [(2, "during_tensors"), (0, "before_commit")])
def test_killed_sharded_save_leaves_the_previous_checkpoint(written: Path, tmp_path: Path, rank: int,
                                                            point: str) -> None:
    target = tmp_path / "ck"
    shutil.copytree(written, target)
    with pytest.raises(AssertionError, match="exited with") as died:
        run_mpi(4, SCRIPT, "kill", str(target), timeout=300, env={KILL_ENV: f"{rank}:{point}"})
    assert "signal 9" in str(died.value) and "saved without being killed" not in str(died.value)
    assert not filecmp.dircmp(written, target).diff_files
    assert sorted(p.name for p in target.iterdir()) == sorted(p.name for p in written.iterdir())
    assert read_index(target)["extra"] == {"step": 3}
