"""Draw a plan: per-rank Gantt chart of the simulated schedule and per-rank memory bars."""

from __future__ import annotations

import os

from rannc_py.planner.plan import Plan
from rannc_py.schedule import ActionKind, Timeline

_COLORS = {ActionKind.FORWARD: "tab:blue", ActionKind.BACKWARD: "tab:orange", ActionKind.ALLREDUCE: "tab:green"}


def draw_plan(plan: Plan, timeline: Timeline, path: str | os.PathLike[str]) -> None:
    """Write a PNG with the step's timeline (one row per stage; every replica of a
    stage runs the same row) and each rank's predicted peak memory.

    Args:
        plan: the plan.
        timeline: :func:`rannc_py.schedule.simulate` of the plan's schedule.
        path: output PNG path.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, mx) = plt.subplots(2, 1, figsize=(11, 2.0 + 0.5 * plan.num_stages + 2.5))
    for ev in timeline.events:
        color = _COLORS.get(ev.action.kind)
        if color is None or ev.end <= ev.start:
            continue
        ax.barh(ev.stage, ev.end - ev.start, left=ev.start, color=color, edgecolor="black", linewidth=0.3)
        if ev.action.microbatch is not None and plan.microbatches <= 16:
            ax.text((ev.start + ev.end) / 2, ev.stage, str(ev.action.microbatch), ha="center", va="center",
                    fontsize=6)
    ax.set_yticks(range(plan.num_stages))
    ax.set_yticklabels([f"stage {s.index} (ranks {s.ranks[0]}-{s.ranks[-1]})" for s in plan.stages], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("seconds")
    ax.set_title(f"{plan.schedule}, {plan.microbatches} microbatches: predicted step {plan.step_time:.4g} s "
                 "(blue forward, orange backward, green allreduce)", fontsize=9)
    mem = [b / 2**30 for b in plan.peak_memory_per_rank]
    mx.bar(range(plan.world_size), mem, color="tab:purple", width=1.0)
    mx.set_xlabel("rank")
    mx.set_ylabel("peak memory (GiB)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
