"""Draw a plan: a Gantt chart of its simulated step and each rank's predicted peak memory.

One picture for the command line's ``--png`` and the example scripts. The
Gantt chart has one row per pipeline position (a stage, or with several model
chunks per rank the stages its ranks hold, named in the row's label; every
replica runs the same row), forward in blue, backward in orange (a split
backward's input-gradient half in orange, its weight-gradient half in red),
the gradient allreduce and the optimizer step in green, and messages to the neighbouring stages as thin grey
bars; the memory panel uses other colours so it is not read as forward or
backward. A stage of tensor degree t > 1 says so in its label ("tp t": each
replica a group of t ranks), and the share of its forward and backward bars
that its tensor group's collectives take
(:attr:`~rannc_py.planner.plan.StagePlan.tensor_collectives` over the
stage's forward + backward per microbatch) is hatched at the end of each bar.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rannc_py.planner.plan import Plan, StagePlan
from rannc_py.schedule import ActionKind, Timeline

K = ActionKind
# (kind, colour, legend label); sends share a colour and a label.
_COMPUTE = ((K.FORWARD, "tab:blue", "forward"), (K.BACKWARD, "tab:orange", "backward"),
            (K.BACKWARD_INPUT, "tab:orange", "backward, input gradients (I)"),
            (K.BACKWARD_WEIGHT, "tab:red", "backward, weight gradients (W)"),
            (K.ALLREDUCE, "tab:green", "gradient allreduce + optimizer step"))
# Compute kinds whose bars carry microbatch (and, with chunks, stage) numbers.
_NUMBERED_KINDS = (K.FORWARD, K.BACKWARD, K.BACKWARD_INPUT, K.BACKWARD_WEIGHT)
_SEND_COLOUR = "0.55"
# Memory bars: colour by recompute; neither blue nor orange, which mean forward/backward above.
_MEM_COLOURS = {False: "tab:purple", True: "tab:olive"}
_TIME_UNITS = (("s", 1.0), ("ms", 1e-3), ("us", 1e-6), ("ns", 1e-9))
_BYTE_UNITS = (("TiB", 2.0**40), ("GiB", 2.0**30), ("MiB", 2.0**20), ("KiB", 2.0**10), ("B", 1.0))
# Up to this many ranks the memory panel has one bar per rank, beyond it one per stage replica group.
RANK_BARS = 16
# At most this many stage labels on the Gantt chart's axis (every k-th stage beyond it).
STAGE_LABELS = 32
# Microbatch numbers are written on the bars when there are at most this many microbatches and stages.
NUMBERED = 16


def unit(values: Sequence[float], units: tuple[tuple[str, float], ...]) -> tuple[str, float]:
    """The largest of ``units`` (name, size; largest first) in which the biggest value is at least 1.

    Returns ``(name, size)``; the smallest unit when every value is below it.
    """
    top = max((abs(v) for v in values), default=0.0)
    for name, size in units:
        if top >= size:
            return name, size
    return units[-1]


def rank_range(st: StagePlan) -> str:
    """``"rank 3"`` or ``"ranks 0-7"``: the ranks holding a stage's replicas (contiguous in planner plans)."""
    if len(st.ranks) == 1:
        return f"rank {st.ranks[0]}"
    groups = f", {st.replicas} x tp {st.tensor}" if st.tensor > 1 else ""
    if list(st.ranks) == list(range(st.ranks[0], st.ranks[-1] + 1)):
        return f"ranks {st.ranks[0]}-{st.ranks[-1]}{groups}"
    return f"{len(st.ranks)} ranks from {st.ranks[0]}{groups}"


def draw_plan(plan: Plan, path: str | os.PathLike[str], *, timeline: Timeline | None = None,
              title: str | None = None) -> Path:
    """Write a PNG of one simulated step of ``plan`` and its predicted peak memory per rank.

    Args:
        plan: the plan.
        path: where to write the PNG.
        timeline: the step to draw; default :meth:`Plan.timeline`, the planner's own simulation.
        title: a heading put before the plan's description (default none).
    Returns:
        ``path`` as a :class:`Path`.
    Raises:
        PlanError: ``timeline`` is None and the plan records no stage costs (see :meth:`Plan.timeline`).
    """
    import matplotlib.pyplot as plt

    fig = plan_figure(plan, timeline=timeline, title=title)
    path = Path(path)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plan_figure(plan: Plan, *, timeline: Timeline | None = None, title: str | None = None) -> Any:
    """The figure :func:`draw_plan` writes: a matplotlib ``Figure`` whose two axes are
    the Gantt chart and the memory panel. Same arguments and raises as :func:`draw_plan`;
    the caller closes it (``matplotlib.pyplot.close(fig)``).
    """
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on cluster nodes
    import matplotlib.pyplot as plt

    tl = plan.timeline() if timeline is None else timeline
    p = plan.num_positions
    gantt_h = min(max(0.32 * p + 1.2, 2.4), 11.0)
    fig, (ax, mx) = plt.subplots(2, 1, figsize=(12, gantt_h + 3.4),
                                 gridspec_kw={"height_ratios": [gantt_h, 2.4]})
    _gantt(ax, plan, tl, title)
    _memory(mx, plan)
    fig.tight_layout()
    return fig


def draw_measured(plan: Plan, measured: Timeline, path: str | os.PathLike[str]) -> Path:
    """Write a PNG of a measured step above the plan's predicted one, on one time axis.

    Args:
        plan: the plan the step ran.
        measured: the measured step as a :class:`Timeline` (seconds from its
            start; :func:`rannc_py.runtime.trace.measured_timeline`).
        path: where to write the PNG.
    Returns:
        ``path`` as a :class:`Path`. Without stage costs in the plan only the
        measured chart is drawn.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    predicted = plan.timeline() if all(st.costs is not None for st in plan.stages) else None
    p = plan.num_positions
    h = min(max(0.32 * p + 1.2, 2.4), 11.0)
    fig, axes = plt.subplots(2 if predicted else 1, 1, figsize=(12, h * (2 if predicted else 1) + 0.6),
                             squeeze=False)
    span = max(measured.step_time, predicted.step_time if predicted else 0.0)
    _gantt(axes[0][0], plan, measured, "measured", what="measured", span=span)
    if predicted is not None:
        _gantt(axes[1][0], plan, predicted, "predicted", span=span)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _gantt(ax: Any, plan: Plan, tl: Timeline, title: str | None, what: str = "predicted",
           span: float | None = None) -> None:
    """One Gantt chart of ``tl``; ``span``: the seconds the time axis covers (default the step)."""
    from matplotlib.patches import Patch

    p, m = plan.num_positions, plan.microbatches  # one row per position: its ranks' action list
    chunked = plan.chunks > 1
    firsts = list(range(p))  # stage r runs on position r (interleaved and zb-v alike): its first stage
    tensor_drawn = False
    span = tl.step_time if span is None else span
    tname, tsize = unit([span], _TIME_UNITS)
    bars: dict[tuple[int, ActionKind], list[tuple[float, float]]] = {}
    for e in tl.events:
        if e.end > e.start and e.action.kind not in (K.RECV_ACT, K.RECV_GRAD):
            key = K.SEND_ACT if e.action.kind is K.SEND_GRAD else e.action.kind
            bars.setdefault((e.stage, key), []).append((e.start / tsize, (e.end - e.start) / tsize))
    many = len(tl.events) > 4000  # black edges would hide thin bars
    edge: dict[str, Any] = {"edgecolor": "none"} if many else {"edgecolor": "black", "linewidth": 0.3}
    for s in range(p):
        # Compute fills the upper part of the row, messages a thin strip under it.
        for kind, colour, _ in _COMPUTE:
            if (s, kind) in bars:
                ax.broken_barh(bars[s, kind], (s - 0.4, 0.6), facecolors=colour, **edge)
        if (s, K.SEND_ACT) in bars:
            ax.broken_barh(bars[s, K.SEND_ACT], (s + 0.24, 0.14), facecolors=_SEND_COLOUR, edgecolor="none")
        share = _collective_share(plan.stages[firsts[s]])
        if share > 0:
            tail = [(x + w * (1 - share), w * share) for kind in (K.FORWARD, K.BACKWARD, K.BACKWARD_INPUT)
                    for x, w in bars.get((s, kind), [])]
            ax.broken_barh(tail, (s - 0.4, 0.6), facecolors="none", edgecolor="black", hatch="////", linewidth=0)
            tensor_drawn = True
    if m <= NUMBERED and p <= NUMBERED:
        for e in tl.events:
            # Only on bars wide enough for the digits (about 0.8% of the axis per character).
            text = f"{e.action.stage}.{e.action.microbatch}" if chunked else str(e.action.microbatch)
            wide = tl.step_time > 0 and (e.end - e.start) / tl.step_time > 0.008 * len(text)
            if e.action.kind in _NUMBERED_KINDS and wide:
                ax.text((e.start + e.end) / 2 / tsize, e.stage - 0.1, text, ha="center", va="center", fontsize=6)
    every = math.ceil(p / STAGE_LABELS)
    labels = [_row_label(plan, firsts[r]) for r in range(0, p, every)]
    ax.set_yticks(list(range(0, p, every)), labels, fontsize=8 if p <= 16 else 6)
    ax.set_ylim(p - 0.5, -0.5)
    if span > 0:
        ax.set_xlim(0, span / tsize * 1.01)
    ax.set_xlabel(f"time in one training step ({tname})")
    ax.grid(axis="x", alpha=0.3)
    busy = sum(tl.busy) / (len(tl.busy) * tl.step_time) if tl.step_time > 0 and tl.busy else 0.0
    rows = plan.batch_size // plan.microbatches
    head = f"{title}: " if title else ""
    degrees = sorted({st.tensor for st in plan.stages})
    tp = f"tensor degree {'/'.join(map(str, degrees))}, " if degrees != [1] else ""
    n = plan.num_stages
    chunks = f" ({plan.chunks} per rank on {p} positions)" if chunked else ""
    ax.set_title(f"{head}{n} stage{'s' * (n > 1)}{chunks} on {plan.world_size} ranks, {tp}{plan.schedule}, "
                 f"{m} microbatches of {rows} row{'s' * (rows > 1)}; {what} step "
                 f"{tl.step_time / tsize:.4g} {tname}, stages busy {100 * busy:.0f}%", fontsize=9, loc="left")
    drawn = {kind for _, kind in bars}
    if {K.BACKWARD_INPUT, K.BACKWARD_WEIGHT} & drawn:
        drawn.discard(K.BACKWARD)
    handles = [Patch(facecolor=c, edgecolor="black", linewidth=0.3, label=lab)
               for kind, c, lab in _COMPUTE if kind in drawn]
    if K.SEND_ACT in drawn:
        handles.append(Patch(facecolor=_SEND_COLOUR, label="send to the next/previous stage"))
    if tensor_drawn:
        handles.append(Patch(facecolor="white", edgecolor="black", hatch="////", linewidth=0.3,
                             label="tensor-group collectives (share of F/B)"))
    if m <= NUMBERED and p <= NUMBERED:
        handles.append(Patch(facecolor="white", edgecolor="none",
                             label="numbers: stage.microbatch" if chunked else "numbers: microbatch"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=8, frameon=False)


def _row_label(plan: Plan, stage: int) -> str:
    """The Gantt row label of the position running ``stage``: its stage (or, with chunks, every
    stage its ranks hold), its ranks, and recompute."""
    st = plan.stages[stage]
    if plan.chunks == 1:
        return f"stage {st.index} ({rank_range(st)})" + (", recompute" if st.recompute else "")
    held = plan.stages_of_rank(st.ranks[0])
    rec = [s for s in held if plan.stages[s].recompute]
    note = "" if not rec else ", recompute " + ",".join(map(str, rec))
    return f"stages {','.join(map(str, held))} ({rank_range(st)}){note}"


def _collective_share(st: StagePlan) -> float:
    """The share of a stage's forward + backward per microbatch its tensor group's collectives take."""
    if st.tensor <= 1 or st.costs is None or st.tensor_collectives <= 0:
        return 0.0
    total = st.costs.forward + st.costs.backward
    return min(st.tensor_collectives / total, 1.0) if total > 0 else 0.0


def _memory(mx: Any, plan: Plan) -> None:
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

    mem = list(plan.peak_memory_per_rank)
    mname, msize = unit(mem, _BYTE_UNITS)
    if plan.world_size <= RANK_BARS:
        ranks = range(plan.world_size)
        colours = [_MEM_COLOURS[any(plan.stages[s].recompute for s in plan.stages_of_rank(r))] for r in ranks]
        mx.bar(list(ranks), [mem[r] / msize for r in ranks], width=0.8, color=colours)
        held = [plan.stages_of_rank(r) for r in ranks]
        # Several stages per rank on many ranks: the short form ("s0,2") keeps the labels apart.
        word = "s" if len(ranks) * max(map(len, held), default=1) > 16 else "stage"
        mx.set_xticks(list(ranks), [f"{r}\n{word}{'s' * (len(h) > 1 and word == 'stage')} {','.join(map(str, h))}"
                                    for r, h in zip(ranks, held)], fontsize=8)
        mx.set_xlabel("rank")
    else:
        # One bar per stage spanning its ranks: the ranks of a stage's replicas share one prediction.
        # With chunks, one bar per position (its stages share its ranks), named by its stages.
        for st in plan.stages[:plan.num_positions]:  # stage r: position r's first
            left, right = min(st.ranks), max(st.ranks)
            top = max(mem[r] for r in st.ranks) / msize
            mine = plan.stages_of_rank(st.ranks[0])
            rec = any(plan.stages[s].recompute for s in mine)
            mx.bar(left - 0.5, top, width=right - left + 1, align="edge", color=_MEM_COLOURS[rec],
                   edgecolor="white", linewidth=0.5)
            name = ",".join(map(str, mine))
            if plan.num_positions <= 8:
                label = f"stage{'s' * (len(mine) > 1)} {name}\n{rank_range(st)}"
            else:
                label = name if plan.num_positions <= STAGE_LABELS else ""
            mx.text((left + right) / 2, top, label, ha="center", va="bottom", fontsize=7)
        mx.set_xlim(-0.5, plan.world_size - 0.5)
        mx.xaxis.set_major_locator(MaxNLocator(integer=True))
        mx.set_xlabel("rank (one bar per stage, over the ranks of its replicas" +
                      ("; numbers: stage)" if 8 < plan.num_positions <= STAGE_LABELS else ")"))
    mx.set_ylabel(f"predicted peak\nmemory ({mname})", fontsize=8)
    mx.set_ylim(0, max(mem) / msize * 1.15 if max(mem) > 0 else 1)
    mx.grid(axis="y", alpha=0.3)
    handles = [Patch(facecolor=_MEM_COLOURS[rec], label=("stage recomputes activations" if rec
                                                         else "stage keeps activations"))
               for rec in sorted({st.recompute for st in plan.stages})]  # with chunks: any of the rank's stages
    mx.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=8, frameon=False)
