"""The measured timeline: ``RaNNCModule(trace=...)`` (multi-rank checks in
tests/mpi_scripts/runtime_trace.py) and its pieces."""

from __future__ import annotations

import json

import pytest
from mpi_launch import REPO, run_mpi

import rannc_py
from rannc_py.runtime.trace import StepTracer, check_trace_arg, measured_timeline, step_totals, trace_events
from rannc_py.schedule import ActionKind

SCRIPT = REPO / "tests/mpi_scripts/runtime_trace.py"


@pytest.mark.parametrize("ranks", [1, 2])
def test_trace_of_a_run(ranks: int) -> None:
    out = run_mpi(ranks, SCRIPT, "trace_file", "close_writes_what_was_recorded", timeout=300).stdout
    assert "trace_file: ok" in out and "close_writes_what_was_recorded: ok" in out


def test_bad_trace_arguments_are_config_errors(tmp_path) -> None:
    with pytest.raises(rannc_py.ConfigError, match="ending in .json"):
        check_trace_arg(tmp_path / "trace.txt", 3)
    with pytest.raises(rannc_py.ConfigError, match="trace_steps"):
        check_trace_arg(tmp_path / "trace.json", 0)
    with pytest.raises(rannc_py.ConfigError, match="path"):
        check_trace_arg(3, 3)  # type: ignore[arg-type]
    assert check_trace_arg(None, 3) is None


def _records() -> list[list[tuple]]:
    # rank 0 runs stage 0, rank 1 stage 1; one step (number 2) of F, SEND/RECV, B, and the step span
    ms = 1_000_000
    r0 = [("F0", "F", 0, 2 * ms, 2, 0, 0), ("SEND_F0", "SEND_F", 2 * ms, 2 * ms + 10, 2, 0, 0),
          ("B0", "B", 5 * ms, 8 * ms, 2, 0, 0), ("optimizer step", "phase", 8 * ms, 9 * ms, 2, None, None),
          ("step 1", "step", 0, 9 * ms, 2, None, None)]
    r1 = [("F0", "F", 2 * ms, 3 * ms, 2, 1, 0), ("B0", "B", 3 * ms, 5 * ms, 2, 1, 0),
          ("inputs", "phase", 0, 10, 2, None, None), ("step 1", "step", 0, 6 * ms, 2, None, None)]
    return [r0, r1]


class _TwoStages:
    num_stages = 2

    class _St:
        def __init__(self, r: int) -> None:
            self.ranks = (r,)

    stages = (_St(0), _St(1))

    def stage_of_rank(self, r: int) -> int:
        return r

    def stages_of_rank(self, r: int) -> tuple[int, ...]:
        return (r,)


def test_trace_events_are_trace_event_json() -> None:
    events = trace_events(_records(), _TwoStages())
    json.dumps(events)  # serialisable
    tracks = {e["tid"]: e["args"]["name"] for e in events if e["name"] == "thread_name"}
    assert tracks == {0: "rank 0 (stage 0)", 1: "rank 1 (stage 1)"}
    spans = [e for e in events if e["ph"] == "X"]
    assert all(e["pid"] == 0 and e["dur"] >= 0 for e in spans)
    f0 = next(e for e in spans if e["tid"] == 0 and e["name"] == "F0")
    assert f0["ts"] == 0 and f0["dur"] == pytest.approx(2000.0) and f0["args"] == {"step": 2, "stage": 0, "microbatch": 0}
    assert step_totals(events) == {2: pytest.approx(0.009)}


def test_measured_timeline_draws_one_row_per_stage() -> None:
    tl = measured_timeline(_records(), _TwoStages())
    assert tl.step_time == pytest.approx(0.009)
    kinds = {(e.stage, e.action.kind) for e in tl.events}
    # the optimizer step is drawn as the ALLREDUCE it stands for; other phases and the step span are not drawn
    assert (0, ActionKind.ALLREDUCE) in kinds and (0, ActionKind.FORWARD) in kinds and (1, ActionKind.BACKWARD) in kinds
    assert len(tl.events) == 6
    assert tl.busy == (pytest.approx(0.006), pytest.approx(0.003))


def test_tracer_records_only_the_chosen_training_steps(tmp_path) -> None:
    tr = StepTracer(path=tmp_path / "t.json", steps=2)
    from rannc_py.schedule import Action

    a = Action(ActionKind.FORWARD, 0, 0)
    for training in (True, False, True, True, True):
        tr.begin_step(training)
        tr.action(a, 0)
    tr.close_step()
    steps = sorted({s.step for s in tr.spans})
    assert steps == [2, 3]  # the first training step skipped, the eval call not counted, then two
    assert tr.done
