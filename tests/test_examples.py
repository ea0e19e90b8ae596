"""Smoke tests of the GPT and BERT training scripts (tiny sizes, a few steps).

Eager runs check that training learns and that --save/--resume continues
exactly; rannc_py runs on 1 and 2 ranks check that the losses equal the eager
ones and that the pictures are written.
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
COMMON = ["--size", "tiny", "--batch-size", "8", "--docs", "300"]


def run_eager(kind: str, out: Path, *args: str) -> list[float]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(SCRIPTS[kind]), *COMMON, "--eager", "--out", str(out), *args]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=120, env=env, cwd=str(REPO), check=False
    )
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout}\n{proc.stderr}"
    return json.loads((out / "losses.json").read_text())


def run_rannc(kind: str, ranks: int, out: Path, *args: str) -> list[float]:
    run_mpi(ranks, SCRIPTS[kind], *COMMON, "--out", str(out), *args, timeout=300)
    return json.loads((out / "losses.json").read_text())


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
    # Same data order and optimizer state: the continuation is the same computation.
    torch.testing.assert_close(torch.tensor(resumed), torch.tensor(whole), rtol=1e-6, atol=0)


def _needs_runtime() -> None:
    pytest.importorskip("rannc_py.runtime.module", reason="rannc_py.runtime.module (RaNNCModule) not built yet")


PIPELINE = ["--stages", "2", "--microbatches", "2"]


@pytest.mark.parametrize("kind,ranks,layout", [("gpt", 1, []), ("gpt", 2, PIPELINE), ("bert", 2, PIPELINE)])
def test_rannc_matches_eager_and_draws_the_plan(kind: str, ranks: int, layout: list[str], tmp_path: Path) -> None:
    _needs_runtime()
    ref = run_eager(kind, tmp_path / "eager", "--steps", "4")
    got = run_rannc(kind, ranks, tmp_path / "rannc", "--steps", "4", *layout)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), rtol=1e-5, atol=1e-6)
    summary = json.loads((tmp_path / "rannc" / "summary.json").read_text())
    assert summary["ranks"] == ranks
    if not layout:  # planned, not hand-given: the plan carries predictions
        assert summary["predicted_step_time"] > 0
    assert (tmp_path / "rannc" / "timeline.png").stat().st_size > 0
    assert (tmp_path / "rannc" / "loss.png").stat().st_size > 0


def test_rannc_pipeline_resume_and_plan_reuse(tmp_path: Path) -> None:
    _needs_runtime()
    plan = ["--plan", str(tmp_path / "plan.json")]
    whole = run_rannc("gpt", 2, tmp_path / "whole", "--steps", "6", *PIPELINE, *plan)
    assert (tmp_path / "plan.json").exists()  # saved by the first run, reused by the next two
    run_rannc("gpt", 2, tmp_path / "first", "--steps", "3", "--save", str(tmp_path / "ckpt"), *plan)
    resumed = run_rannc("gpt", 2, tmp_path / "resumed", "--steps", "6", "--resume", str(tmp_path / "ckpt"), *plan)
    torch.testing.assert_close(torch.tensor(resumed), torch.tensor(whole), rtol=1e-6, atol=0)

def test_plan_timeline_picture(tmp_path: Path) -> None:
    from examples.common.plots import plan_timeline, plot_losses, plot_timeline
    from rannc_py.planner.plan import Plan, StagePlan

    stages = tuple(
        StagePlan(index=s, ops=(2 * s, 2 * s + 1), param_fqns=(f"w{s}",), ranks=(2 * s, 2 * s + 1),
                  recompute=False, predicted_compute_time=0.3 * (s + 1), predicted_peak_memory=1 << 20)
        for s in range(2)
    )
    plan = Plan(batch_size=8, microbatches=4, schedule="1f1b", stages=stages, world_size=4,
                graph_fingerprint="x", cluster="test", step_time=1.0, peak_memory_per_rank=(1 << 20,) * 4,
                samples_per_second=8.0, mfu=0.1, search_time=0.0)
    timeline = plan_timeline(plan)
    # The slower stage's work bounds the step: 4 microbatches x (fwd + bwd) = its compute time.
    assert timeline.busy[1] == pytest.approx(0.6)
    assert timeline.step_time >= 0.6
    assert plot_timeline(timeline, tmp_path / "t.png").stat().st_size > 0
    assert plot_losses([3.0, 2.0, 1.0], tmp_path / "l.png").stat().st_size > 0
