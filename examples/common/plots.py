"""The pictures the training scripts write: the loss curve and the plan's timeline."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on cluster nodes
import matplotlib.pyplot as plt

from rannc_py.schedule import ActionKind, StageCosts, Timeline, simulate

_COLOURS = {
    ActionKind.FORWARD: "tab:blue",
    ActionKind.BACKWARD: "tab:orange",
    ActionKind.ALLREDUCE: "tab:green",
    ActionKind.SEND_ACT: "tab:grey",
    ActionKind.SEND_GRAD: "tab:grey",
}


def plot_losses(losses: list[float], path: str | Path, title: str = "training loss") -> Path:
    """Takes per-step losses and a file path; writes a PNG of the curve and returns the path."""
    path = Path(path)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(losses) + 1), losses, lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plan_timeline(plan: object) -> Timeline:
    """Simulate one step of ``plan`` (a ``rannc_py.Plan``) from its per-stage predictions.

    Each stage's predicted compute time per step is spread over its
    microbatches, a third forward and two thirds backward (the usual ratio);
    transfers and allreduces are drawn as instantaneous because the plan
    stores only their total in ``step_time``.
    """
    m = plan.microbatches  # type: ignore[attr-defined]
    costs = [
        StageCosts(forward=st.predicted_compute_time / (3 * m), backward=2 * st.predicted_compute_time / (3 * m))
        for st in plan.stages  # type: ignore[attr-defined]
    ]
    return simulate(plan.make_schedule(), costs)  # type: ignore[attr-defined]


def plot_timeline(timeline: Timeline, path: str | Path, title: str = "pipeline timeline") -> Path:
    """Takes a simulated or measured :class:`Timeline`; writes a Gantt chart PNG (one row per stage)."""
    path = Path(path)
    stages = 1 + max((e.stage for e in timeline.events), default=0)
    fig, ax = plt.subplots(figsize=(8, 0.6 * stages + 1.5))
    for e in timeline.events:
        colour = _COLOURS.get(e.action.kind)
        if colour is None or e.end <= e.start:
            continue
        ax.barh(e.stage, e.end - e.start, left=e.start, height=0.6, color=colour, edgecolor="black", lw=0.3)
        if e.action.microbatch is not None and e.action.kind in (ActionKind.FORWARD, ActionKind.BACKWARD):
            ax.text((e.start + e.end) / 2, e.stage, str(e.action.microbatch), ha="center", va="center", fontsize=7)
    ax.set_yticks(range(stages), [f"stage {s}" for s in range(stages)])
    ax.invert_yaxis()
    ax.set_xlabel("seconds")
    ax.set_title(f"{title} (blue forward, orange backward, green allreduce)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
