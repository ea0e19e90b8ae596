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
COMMON = ["--size", "tiny", "--batch-size", "8", "--docs", "300", "--warmup", "2"]


def run_eager(kind: str, out: Path, *args: str) -> list[float]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(SCRIPTS[kind]), *COMMON, "--eager", "--out", str(out), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=str(REPO), check=False)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout}\n{proc.stderr}"
    return json.loads((out / "losses.json").read_text())


def run_rannc(kind: str, ranks: int, out: Path, *args: str) -> tuple[list[float], dict]:
    run_mpi(ranks, SCRIPTS[kind], *COMMON, "--out", str(out), *args, timeout=300)
    return json.loads((out / "losses.json").read_text()), json.loads((out / "summary.json").read_text())


def gpt_state_bytes() -> int:
    """Training state of the tiny GPT: fp32 weights, gradients and two AdamW moments."""
    from examples.gpt.model import GPT, gpt_config

    with torch.device("meta"):
        return 16 * GPT(gpt_config("tiny")).num_parameters()


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


# (script, ranks, flags, stages expected): 1 rank planned freely; 2 ranks under a
# memory limit of 1.25x the model's training state, too little for the state
# plus one step's activations on one rank, which forces 2 pipeline stages;
# 2 ranks with the depth pinned.
CASES = [
    ("gpt", 1, (), 1),
    ("gpt", 2, ("--memory-limit", "LIMIT"), 2),
    ("bert", 2, ("--stages", "2", "--microbatches", "2"), 2),
]


@pytest.mark.parametrize("kind,ranks,flags,stages", CASES)
def test_rannc_matches_eager_and_draws_the_plan(kind: str, ranks: int, flags: tuple[str, ...], stages: int,
                                                tmp_path: Path) -> None:
    flags = tuple(str(int(1.25 * gpt_state_bytes())) if f == "LIMIT" else f for f in flags)
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
                               "--memory-limit", str(int(1.25 * gpt_state_bytes())), *plan)
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
