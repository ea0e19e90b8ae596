"""A measured timeline: every action's start and end on every rank, for a few training steps.

``RaNNCModule(..., trace="trace.json")`` records, on every rank, each
schedule action the executor runs (F, B, sends and receives posted, the
ALLREDUCE hand-over), the step's other phases (moving the inputs in, waiting
for the gradient sums, returning the outputs, the optimizer step) and one
span per step (the forward call's start to the optimizer step's end, what a
training loop times as its step). Timestamps are ``time.perf_counter_ns``
(monotonic, tens of nanoseconds per reading); with tracing off the executor
tests one ``None`` per action and nothing else.

When the chosen steps have run, the ranks estimate their clock offsets from
rank 0 (ping-pong, the round trip with the least delay wins), shift their
records onto rank 0's clock and send them to rank 0, which writes

- a trace-event JSON (the format Perfetto and ``chrome://tracing`` open):
  one process, one track (thread) per rank, complete ("X") events in
  microseconds from the first recorded step's start;
- a PNG next to it (same name, ``.png``): the measured timeline of the
  median step above the plan's predicted one, drawn the same way with the
  same colours (:func:`rannc_py.planner.viz.draw_measured`).
"""

from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mpi4py import MPI

from rannc_py._util import atomic_write
from rannc_py.errors import ConfigError
from rannc_py.schedule import Action, ActionKind, Event, Timeline

clock_ns = time.perf_counter_ns
# Ping-pong rounds per rank for the clock offsets; the one with the shortest round trip is kept.
OFFSET_ROUNDS = 16
# Spans that are not schedule actions, and how they show in the trace.
PHASES = ("inputs", "gradient sums", "outputs", "optimizer step")
# The phases the picture draws, as the ALLREDUCE they stand for in the prediction.
_DRAWN = (PHASES[1], PHASES[3])


@dataclass
class _Span:
    name: str
    cat: str
    start: int
    end: int
    step: int
    stage: int | None = None
    microbatch: int | None = None


@dataclass
class StepTracer:
    """This rank's records for ``steps`` training steps after skipping ``skip`` of them.

    Args:
        path: where rank 0 writes the trace-event JSON (the PNG goes beside it).
        steps: training steps to record (>= 1).
        skip: training steps to leave out first (the first call traces and plans).
    """

    path: Path
    steps: int
    skip: int = 1
    spans: list[_Span] = field(default_factory=list)
    seen: int = 0  # training steps begun
    recording: bool = False
    written: bool = False
    _step_start: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps < 1:
            raise ConfigError(f"trace_steps must be an integer >= 1, got {self.steps!r}")
        self.path = Path(self.path)
        if self.path.suffix != ".json":
            raise ConfigError(f"trace= names the trace-event JSON to write; give a path ending in .json, "
                              f"got {str(self.path)!r}")

    @property
    def done(self) -> bool:
        """All chosen steps are recorded (the trace can be written)."""
        return self.seen >= self.skip + self.steps and not self.recording

    def begin_step(self, training: bool) -> None:
        """A forward call starts: record it if it is one of the chosen training steps."""
        self.close_step()
        if not training or self.written:
            return
        self.seen += 1
        self.recording = self.skip < self.seen <= self.skip + self.steps
        self._step_start = clock_ns()

    def action(self, a: Action, start: int) -> None:
        """Record action ``a`` of this step, begun at ``start`` and ending now."""
        if self.recording:
            self.spans.append(_Span(str(a), a.kind.value, start, clock_ns(), self.seen, a.stage, a.microbatch))

    def phase(self, name: str, start: int) -> None:
        """Record a step phase (one of :data:`PHASES`) begun at ``start`` and ending now."""
        if self.recording:
            self.spans.append(_Span(name, "phase", start, clock_ns(), self.seen))

    def close_step(self) -> None:
        """End the step being recorded (at the optimizer step's end, or at the next call)."""
        if self.recording:
            end = max([s.end for s in self.spans if s.step == self.seen], default=clock_ns())
            self.spans.append(_Span(f"step {self.seen - self.skip}", "step", self._step_start, end, self.seen))
            self.recording = False

    # ------------------------------------------------------------- output
    def write(self, comm: MPI.Comm, plan: Any) -> Path | None:
        """Gather every rank's records on rank 0 and write the JSON and PNG (collective).

        Returns the JSON's path on rank 0, None elsewhere.
        """
        self.close_step()
        offset = clock_offset(comm)
        mine = [(s.name, s.cat, s.start - offset, s.end - offset, s.step, s.stage, s.microbatch) for s in self.spans]
        gathered = comm.gather(mine, root=0)
        self.written = True
        self.spans = []
        if comm.Get_rank() != 0:
            return None
        assert gathered is not None
        events = trace_events(gathered, plan)
        text = json.dumps({"traceEvents": events, "displayTimeUnit": "ms"})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, text.encode())
        if plan is not None and plan.num_stages > 0:
            from rannc_py.planner.viz import draw_measured

            draw_measured(plan, measured_timeline(gathered, plan), self.path.with_suffix(".png"))
        return self.path


def clock_offset(comm: MPI.Comm) -> int:
    """This rank's clock minus rank 0's, in nanoseconds (0 on rank 0; collective).

    Rank 0 sends its reading to each rank in turn, which answers with its own;
    the offset assumes the answer was read halfway through the round trip and
    comes from the round with the shortest round trip.
    """
    rank, size = comm.Get_rank(), comm.Get_size()
    offset = 0
    for other in range(1, size):
        if rank == 0:
            best: tuple[int, int] | None = None
            for _ in range(OFFSET_ROUNDS):
                t0 = clock_ns()
                comm.send(t0, dest=other, tag=7)
                theirs = comm.recv(source=other, tag=7)
                t1 = clock_ns()
                cand = (t1 - t0, theirs - (t0 + t1) // 2)
                best = cand if best is None or cand < best else best
            assert best is not None
            comm.send(best[1], dest=other, tag=8)
        elif rank == other:
            for _ in range(OFFSET_ROUNDS):
                comm.recv(source=0, tag=7)
                comm.send(clock_ns(), dest=0, tag=7)
            offset = comm.recv(source=0, tag=8)
    return offset


Record = tuple[str, str, int, int, int, "int | None", "int | None"]


def trace_events(per_rank: list[list[Record]], plan: Any) -> list[dict[str, Any]]:
    """Trace-event JSON events: a name per track, then every span as a complete event in microseconds."""
    starts = [r[2] for recs in per_rank for r in recs]
    origin = min(starts, default=0)
    events: list[dict[str, Any]] = [{"name": "process_name", "ph": "M", "pid": 0, "args": {"name": "rannc_py step"}}]
    for rank, recs in enumerate(per_rank):
        held = plan.stages_of_rank(rank) if plan is not None else ()
        label = f"rank {rank}" + (f" (stage{'s' if len(held) > 1 else ''} {', '.join(map(str, held))})"
                                  if held else "")
        events.append({"name": "thread_name", "ph": "M", "pid": 0, "tid": rank, "args": {"name": label}})
        events.append({"name": "thread_sort_index", "ph": "M", "pid": 0, "tid": rank, "args": {"sort_index": rank}})
        for name, cat, start, end, step, st, mb in recs:
            args: dict[str, Any] = {"step": step}
            if st is not None:
                args["stage"] = st
            if mb is not None:
                args["microbatch"] = mb
            events.append({"name": name, "cat": cat, "ph": "X", "pid": 0, "tid": rank, "ts": (start - origin) / 1e3,
                           "dur": (end - start) / 1e3, "args": args})
    return events


def step_totals(events: list[dict[str, Any]]) -> dict[int, float]:
    """Seconds per recorded step, from a trace's events: the first rank's start to the last rank's end."""
    spans: dict[int, list[float]] = {}
    for e in events:
        if e.get("cat") == "step":
            spans.setdefault(e["args"]["step"], []).extend([e["ts"], e["ts"] + e["dur"]])
    return {k: (max(v) - min(v)) / 1e6 for k, v in sorted(spans.items())}


_COMPUTE_KINDS = {k.value: k for k in ActionKind}


def measured_timeline(per_rank: list[list[Record]], plan: Any) -> Timeline:
    """The median recorded step as a :class:`Timeline` (seconds from its start), the gradient-sum
    wait and the optimizer step drawn as the ALLREDUCE they stand for in the prediction."""
    steps: dict[int, list[tuple[int, Record]]] = {}
    for rank, recs in enumerate(per_rank):
        for r in recs:
            steps.setdefault(r[4], []).append((rank, r))
    if not steps:
        return Timeline(step_time=0.0, events=(), busy=(), max_in_flight=())
    length = {k: max(r[3] for _, r in v) - min(r[2] for _, r in v) for k, v in steps.items()}
    median = statistics.median_low(length.values())
    chosen = min(k for k, v in length.items() if v == median)
    origin = min(r[2] for _, r in steps[chosen])
    events = []
    busy = [0.0] * plan.num_stages
    for rank, (name, cat, start, end, _, st, mb) in steps[chosen]:
        # an action on its own stage's row (a rank holds several with model chunks); a phase on the rank's first
        stage = st if st is not None else plan.stage_of_rank(rank)
        if stage is None or cat == "step" or (cat == "phase" and name not in _DRAWN):
            continue
        if rank != plan.stages[stage].ranks[0]:
            continue  # one row per stage, as the prediction draws it: the stage's first replica
        kind = _COMPUTE_KINDS.get(cat, ActionKind.ALLREDUCE)
        e = Event(stage=stage, action=Action(kind, stage, mb), start=(start - origin) / 1e9, end=(end - origin) / 1e9)
        events.append(e)
        if kind not in (ActionKind.SEND_ACT, ActionKind.SEND_GRAD, ActionKind.RECV_ACT, ActionKind.RECV_GRAD):
            busy[stage] += e.end - e.start
    return Timeline(step_time=median / 1e9, events=tuple(events), busy=tuple(busy),
                    max_in_flight=tuple(0 for _ in busy))


def check_trace_arg(trace: str | os.PathLike[str] | None, steps: int) -> StepTracer | None:
    """The tracer for ``RaNNCModule(trace=..., trace_steps=...)``, None when off. Raises ConfigError."""
    if trace is None:
        return None
    if not isinstance(trace, (str, os.PathLike)):
        raise ConfigError(f"trace must be a path to a .json file or None, got {type(trace).__name__}")
    return StepTracer(path=Path(trace), steps=steps)
