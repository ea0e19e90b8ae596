"""The pictures the training scripts write: the loss curve and the plan's simulated timeline."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on cluster nodes
import matplotlib.pyplot as plt

from rannc_py.planner.plan import Plan
from rannc_py.planner.viz import draw_plan
from rannc_py.schedule import Timeline


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


def plot_timeline(plan: Plan, timeline: Timeline, path: str | Path, title: str = "plan") -> Path:
    """Draw one simulated step of ``plan`` and its predicted memory per rank
    (:func:`rannc_py.planner.viz.draw_plan`, the picture ``python -m rannc_py plan --png`` writes).

    Takes the plan, its simulated :class:`Timeline`, a file path and a heading;
    writes a PNG and returns the path.
    """
    return draw_plan(plan, path, timeline=timeline, title=title)
