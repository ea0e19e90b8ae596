"""Smoke tests of the GPT and BERT training scripts (tiny sizes, a few steps).

Eager runs check that training learns and that --save/--resume continues
exactly. rannc_py runs on 1 and 2 ranks check that the losses equal the eager
ones and fall, that the pictures are written, and that the drawn timeline is
the planner's own simulation (its step time is the plan's prediction); the
2-rank runs also cover --memory-limit, --stages, --cluster, --plan and
--save/--resume under pipeline parallelism.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mpi_launch import REPO, run_mpi

SCRIPTS = {"gpt": REPO / "examples/gpt/train.py", "bert": REPO / "examples/bert/train.py"}
BATCH = 8  # global batch of every run here
COMMON = ["--size", "tiny", "--batch-size", str(BATCH), "--docs", "300", "--warmup", "2"]


def run_eager(kind: str, out: Path, *args: str) -> list[float]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(SCRIPTS[kind]), *COMMON, "--eager", "--out", str(out), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=str(REPO), check=False)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout}\n{proc.stderr}"
    return json.loads((out / "losses.json").read_text())


def run_rannc(kind: str, ranks: int, out: Path, *args: str) -> tuple[list[float], dict]:
    run_mpi(ranks, SCRIPTS[kind], *COMMON, "--out", str(out), *args, timeout=300)
    return json.loads((out / "losses.json").read_text()), json.loads((out / "summary.json").read_text())


@pytest.mark.parametrize("kind", ["gpt", "bert"])
def test_eager_training_learns_and_writes_the_curve(kind: str, tmp_path: Path) -> None:
    losses = run_eager(kind, tmp_path, "--steps", "25")
    assert len(losses) == 25
    assert sum(losses[-5:]) / 5 < losses[0] - 1.0, losses
    assert (tmp_path / "loss.png").stat().st_size > 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["final_loss"] == losses[-1] and summary["ranks"] == 1


def test_eager_resume_continues_the_same_run(tmp_path: Path) -> None:
    whole = run_eager("gpt", tmp_path / "whole", "--steps", "8")
    first = run_eager("gpt", tmp_path / "first", "--steps", "4", "--save", str(tmp_path / "ckpt"))
    resumed = run_eager("gpt", tmp_path / "resumed", "--steps", "8", "--resume", str(tmp_path / "ckpt"))
    assert first == whole[:4]
    # Same data order, learning-rate schedule and optimizer state: the same computation.
    torch.testing.assert_close(torch.tensor(resumed), torch.tensor(whole), rtol=1e-6, atol=0)


def split_forcing_limit() -> int:
    """A per-rank memory limit under which the tiny GPT needs 2 stages on 2 ranks.

    Halfway between the smallest memory any 2-stage layout needs and the
    smallest any 1-stage layout (data parallel, with or without recompute)
    needs, both as the planner reports them for the training script's global
    batch, so the test does not depend on measured times.
    """
    import rannc_py
    from rannc_py.models.gpt import GPT, gpt_config

    cfg = gpt_config("tiny")
    ids = torch.zeros(BATCH // 2, min(cfg.block_size, 128), dtype=torch.long)  # one rank's rows
    graph = rannc_py.trace(GPT(cfg), (), {"input_ids": ids, "labels": ids})
    need = {}
    # One stage needs the least with recompute on; two stages with whatever fits best.
    for stages, recompute in ((1, True), (2, None)):
        with pytest.raises(rannc_py.NoFeasiblePlanError) as e:
            rannc_py.plan(graph, batch_size=BATCH, cluster="local:ranks=2,memory=1", num_stages=stages,
                          recompute=recompute)
        need[stages] = e.value.required_memory
    assert need[2] < need[1], need
    return (need[1] + need[2]) // 2


# (script, ranks, flags, stages expected): 1 rank planned freely; 2 ranks under a
# memory limit too small for one stage and enough for two; 2 ranks with the
# depth pinned.
CASES = [
    ("gpt", 1, (), 1),
    ("gpt", 2, ("--memory-limit", "LIMIT"), 2),
    ("bert", 2, ("--stages", "2", "--microbatches", "2"), 2),
]


@pytest.mark.parametrize("kind,ranks,flags,stages", CASES)
def test_rannc_matches_eager_and_draws_the_plan(kind: str, ranks: int, flags: tuple[str, ...], stages: int,
                                                tmp_path: Path) -> None:
    flags = tuple(str(split_forcing_limit()) if f == "LIMIT" else f for f in flags)
    ref = run_eager(kind, tmp_path / "eager", "--steps", "5")
    got, summary = run_rannc(kind, ranks, tmp_path / "rannc", "--steps", "5", *flags)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), rtol=1e-5, atol=1e-6)
    assert got[-1] < got[0] - 0.3, got
    assert summary["ranks"] == ranks and len(summary["stages"]) == stages and sum(summary["stages"]) == ranks
    assert summary["predicted_step_time"] > 0 and summary["measured_step_time"] > 0
    # The picture is the planner's own simulation of the plan that ran.
    assert summary["simulated_step_time"] == pytest.approx(summary["predicted_step_time"], rel=1e-9)
    assert (tmp_path / "rannc" / "timeline.png").stat().st_size > 0
    assert (tmp_path / "rannc" / "loss.png").stat().st_size > 0


def test_rannc_pipeline_resume_cluster_preset_and_plan_reuse(tmp_path: Path) -> None:
    plan = ["--plan", str(tmp_path / "plan.json")]
    # Planned for two Fugaku nodes with little memory (2 stages needed), run on this machine's 2 ranks.
    whole, summary = run_rannc("gpt", 2, tmp_path / "whole", "--steps", "6", "--cluster", "a64fx:nodes=2",
                               "--memory-limit", str(split_forcing_limit()), *plan)
    assert summary["plan_cluster"].startswith("a64fx:nodes=2") and summary["stages"] == [1, 1]
    assert (tmp_path / "plan.json").exists()  # saved by the first run, reused by the next two
    run_rannc("gpt", 2, tmp_path / "first", "--steps", "3", "--save", str(tmp_path / "ckpt"), *plan)
    resumed, summary = run_rannc("gpt", 2, tmp_path / "resumed", "--steps", "6", "--resume",
                                 str(tmp_path / "ckpt"), *plan)
    assert summary["plan_cluster"].startswith("a64fx:nodes=2")
    torch.testing.assert_close(torch.tensor(resumed), torch.tensor(whole), rtol=1e-6, atol=0)


def test_learning_rate_schedule() -> None:
    from argparse import Namespace

    from examples.common.trainer import learning_rate

    assert [learning_rate(s, Namespace(lr=1.0, warmup=4)) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert learning_rate(0, Namespace(lr=0.5, warmup=0)) == 0.5


def test_parse_bytes() -> None:
    from examples.common.cli import parse_bytes

    assert parse_bytes("64MiB") == 64 * 2**20 and parse_bytes("2GB") == 2 * 10**9 and parse_bytes("1000") == 1000
    with pytest.raises(Exception, match="cannot read"):
        parse_bytes("lots")
