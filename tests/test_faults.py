"""A failure anywhere ends everything; state loading refuses what torch refuses; small semantics.

The fault matrix runs under mpiexec: one rank fails (an exception in user
code between steps or in a custom loss, SIGKILL, SIGTERM, a hang caught by
``timeout=``) and every rank must end within 30 s with that rank's message
first. The rest runs in one process.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mpi_launch import REPO, mpiexec_path, run_mpi
from torch import nn

import rannc_py
from rannc_py.errors import ConfigError, PlanError

sys.path.insert(0, str(REPO / "tests/mpi_scripts"))
from runtime_models import build_model, make_batch

CRASH = REPO / "tests/mpi_scripts/faults_crash.py"
RANKS = 2


def launch(mode: str, bad: int, out: Path) -> tuple[subprocess.CompletedProcess[str], float]:
    """Run the crash script on RANKS ranks; return the finished process and its wall time."""
    env = dict(os.environ, OMP_NUM_THREADS="1", RANNC_TORCH_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    cmd = [mpiexec_path(), "-n", str(RANKS), sys.executable, str(CRASH), mode, str(bad), str(out)]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=str(REPO), check=False)
    return proc, time.monotonic() - t0


def seconds_since_failure(out: Path) -> float:
    """Wall seconds from the moment the failing rank failed (it notes it) until now, the job having ended."""
    return time.time() - float((out / "failed_at").read_text())


def first_error_line(stderr: str) -> str:
    """The first line of stderr that reports a failure (ours or mpiexec's)."""
    for line in stderr.splitlines():
        if line.startswith("[rannc_py]") or "BAD TERMINATION" in line or "Traceback" in line:
            return line
    raise AssertionError(f"no failure reported:\n{stderr}")


# The job ends in ≤ 30 s after the failure; the time also covers starting 2 ranks, tracing and 2 steps.
SETUP_ALLOWANCE = 30


@pytest.mark.parametrize(("mode", "bad", "shows"), [
    ("between", 0, "user code failed on rank 0 between steps"),
    ("between", RANKS - 1, f"user code failed on rank {RANKS - 1} between steps"),
    ("loss", 0, "custom loss failed on rank 0"),
    ("loss", RANKS - 1, f"custom loss failed on rank {RANKS - 1}"),
])
def test_uncaught_exception_ends_every_rank(tmp_path: Path, mode: str, bad: int, shows: str) -> None:
    proc, wall = launch(mode, bad, tmp_path)
    assert proc.returncode != 0 and "unreachable" not in proc.stdout, proc.stdout + proc.stderr
    assert first_error_line(proc.stderr) == f"[rannc_py] rank {bad} raised an uncaught exception; aborting all " \
                                            f"{RANKS} ranks", proc.stderr
    assert f"[rank {bad}] " in proc.stderr and shows in proc.stderr, proc.stderr
    assert seconds_since_failure(tmp_path) <= 30 and wall < 30 + SETUP_ALLOWANCE, wall


@pytest.mark.parametrize(("signal", "bad"), [("SIGKILL", RANKS - 1), ("SIGTERM", 0)])
def test_killed_rank_ends_every_rank(tmp_path: Path, signal: str, bad: int) -> None:
    proc, wall = launch(signal, bad, tmp_path)
    assert proc.returncode != 0 and "unreachable" not in proc.stdout, proc.stdout + proc.stderr
    # mpiexec's report comes first and names the killed rank's process and the signal
    out = proc.stdout + proc.stderr
    assert first_error_line(out).strip("= ").startswith("BAD TERMINATION"), out
    pid = (tmp_path / f"rank{bad}.pid").read_text()
    assert re.search(rf"PID {pid} RUNNING", out) and f"signal {9 if signal == 'SIGKILL' else 15}" in out, out
    assert seconds_since_failure(tmp_path) <= 30 and wall < 30 + SETUP_ALLOWANCE, wall


@pytest.mark.parametrize(("mode", "shows"), [
    ("hang", "in the forward call"),  # rank 1 stops calling: rank 0 waits in the next step
    ("state_dict", ""),  # only rank 1 calls the collective state_dict()
])
def test_watchdog_names_rank_and_wait(tmp_path: Path, mode: str, shows: str) -> None:
    proc, wall = launch(mode, RANKS - 1, tmp_path)
    assert proc.returncode != 0 and "unreachable" not in proc.stdout, proc.stdout + proc.stderr
    first = first_error_line(proc.stderr)
    if mode == "state_dict" and "different collective calls" in proc.stderr:
        # The other rank's forward call met state_dict()'s agreement: named at once, before any timeout.
        assert first == f"[rannc_py] rank {RANKS - 1} raised an uncaught exception; aborting all {RANKS} ranks", first
        assert re.search(r"rank \d: state_dict\(rank0_only=True\)", proc.stderr), proc.stderr
    else:
        assert re.match(r"\[rannc_py\] rank \d made no progress for 8 s \(timeout=\) in ", first), proc.stderr
        assert shows in first and "waiting in " in proc.stderr and "rannc_py/" in proc.stderr, proc.stderr
        if mode == "state_dict":  # whichever rank's watchdog fires first names its own call
            assert "in state_dict" in first or "in the forward call" in first, first
    assert wall < 8 + 30 + SETUP_ALLOWANCE, wall


def test_load_state_dict_refusals_agree_on_every_rank() -> None:
    checks = ["refused_after_step", "refused_before_step", "not_strict", "calls_disagree"]
    out = run_mpi(RANKS, REPO / "tests/mpi_scripts/faults_state.py", *checks, timeout=120).stdout
    for c in checks:
        assert f"{c}: ok" in out, out


# ------------------------------------------------------------ one process
def _gpt() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    return build_model("gpt"), make_batch("gpt", 4, seed=0)


def test_load_state_dict_one_process_returns_torch_keys() -> None:
    model, batch = _gpt()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    wrapped = rannc_py.RaNNCModule(model, plan={"microbatches": 2})
    for when in ("before", "after"):
        if when == "after":
            wrapped(**batch).loss.backward()
        keys = wrapped.load_state_dict({**sd, "x": torch.zeros(1)}, strict=False)
        assert keys.missing_keys == [] and keys.unexpected_keys == ["x"], when
        w = "transformer.h.0.mlp.c_fc.weight"
        with pytest.raises(ConfigError, match=re.escape(f"size mismatch for {w!r}")):
            wrapped.load_state_dict({**sd, w: sd[w][0]})
        with pytest.raises(ConfigError, match="unexpected key"):
            wrapped.load_state_dict({**sd, "x": torch.zeros(1)})
        with pytest.raises(ConfigError, match="not a tensor"):
            wrapped.load_state_dict({**sd, w: [1.0]})
    with pytest.raises(ConfigError, match="assign=True"):
        wrapped.load_state_dict(sd, assign=True)


def test_second_backward_raises_like_eager() -> None:
    model, batch = _gpt()
    wrapped = rannc_py.RaNNCModule(model, plan={"microbatches": 2})
    loss = wrapped(**batch).loss
    loss.backward()
    with pytest.raises(RuntimeError, match="second time"):  # autograd's own error, as in eager
        loss.backward()
    loss = wrapped(**batch).loss
    loss.backward(retain_graph=True)
    grads = [p.grad.clone() for _, p in wrapped.named_parameters()]
    with pytest.raises(RuntimeError, match="second time through a RaNNCModule loss"):
        loss.backward()
    for g, (_, p) in zip(grads, wrapped.named_parameters()):  # nothing was added by the refused backward
        assert torch.equal(g, p.grad)


@pytest.mark.parametrize(("kwargs", "error", "shows"), [
    ({"plan": {"stages": 0}}, ConfigError, "stages=0"),
    ({"plan": {"microbatches": -1}}, ConfigError, "microbatches=-1"),
    ({"plan": {"stages": "2"}}, ConfigError, "stages='2'"),
    ({"plan": {"schedule": "forward_only"}}, ConfigError, "'forward_only' is not a training schedule"),
    ({"plan": {"stages": 2, "recompute": [True]}}, ConfigError, "recompute=[True]"),
    ({"plan": "no-such-dir/plan.json"}, PlanError, "no-such-dir/plan.json"),
    ({"bucket_bytes": 0}, ConfigError, "bucket_bytes must be a positive integer"),
    ({"timeout": -1}, ConfigError, "got -1"),
    ({"timeout": True}, ConfigError, "got True"),
])
def test_options_checked_in_constructor(kwargs: dict, error: type[Exception], shows: str) -> None:
    model, _ = _gpt()
    with pytest.raises(error) as info:  # the constructor raises: nothing traced or profiled
        rannc_py.RaNNCModule(model, **kwargs)
    assert shows in str(info.value), str(info.value)


def _plan_for(model: nn.Module, batch: dict[str, torch.Tensor]) -> rannc_py.Plan:
    return rannc_py.plan(rannc_py.trace(model, kwargs=batch), batch_size=4, cluster="a64fx:nodes=1")


def test_plan_fingerprint_checked(tmp_path: Path) -> None:
    model, batch = _gpt()
    # another model with the same op count: a wider GPT
    torch.manual_seed(0)
    from rannc_py.models.gpt import GPT, GPTConfig

    other = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=48, dropout=0.0))
    plan = _plan_for(other, batch)
    assert sum(len(st.ops) for st in plan.stages) == len(rannc_py.trace(model, kwargs=batch).ops)
    path = tmp_path / "plan.json"
    plan.save(path)
    with pytest.raises(PlanError) as info:
        rannc_py.RaNNCModule(model, plan=str(path))(**batch)
    mine = rannc_py.trace(model, kwargs=batch).fingerprint()
    assert plan.graph_fingerprint[:16] in str(info.value) and mine[:16] in str(info.value), str(info.value)


def test_plan_from_trace_at_another_batch_accepted() -> None:
    model, batch = _gpt()
    small = {k: v[:2] for k, v in batch.items()}  # as the offline planner does: trace small, plan for 4
    plan = _plan_for(model, small)
    assert plan.graph_fingerprint != rannc_py.trace(model, kwargs=batch).fingerprint()
    loss = rannc_py.RaNNCModule(model, plan=plan)(**batch).loss
    assert torch.isfinite(loss)


def test_forward_only_plan_refused() -> None:
    model, batch = _gpt()
    plan = dataclasses.replace(_plan_for(model, batch), schedule="forward_only")
    with pytest.raises(PlanError, match="not a training schedule"):
        rannc_py.RaNNCModule(model, plan=plan)
