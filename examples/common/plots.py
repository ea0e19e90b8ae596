"""The pictures the training scripts write: the loss curve and the plan's simulated timeline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on cluster nodes
import matplotlib.pyplot as plt

from rannc_py.schedule import ActionKind, Timeline

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


def _scale(values: list[float], units: tuple[tuple[str, float], ...]) -> tuple[str, float]:
    """The largest unit in which the biggest of ``values`` is at least 1 (the smallest unit otherwise)."""
    top = max(values, default=0.0)
    for name, size in units:
        if top >= size:
            return name, size
    return units[-1]


_TIME_UNITS = (("s", 1.0), ("ms", 1e-3), ("us", 1e-6))
_BYTE_UNITS = (("GiB", 2.0**30), ("MiB", 2.0**20), ("KiB", 2.0**10), ("B", 1.0))


def plot_timeline(plan: Any, timeline: Timeline, path: str | Path, title: str = "plan") -> Path:
    """Draw one simulated step of ``plan`` (a ``rannc_py.Plan``) and its predicted memory per rank.

    Takes the plan, its simulated :class:`Timeline` (one row per stage; every
    replica of a stage runs the same row) and a file path; writes a PNG and
    returns the path.
    """
    path = Path(path)
    unit, size = _scale([timeline.step_time], _TIME_UNITS)
    stages = plan.num_stages
    fig, (ax, mx) = plt.subplots(2, 1, figsize=(9, 1.2 + 0.55 * stages + 2.4),
                                 gridspec_kw={"height_ratios": [0.55 * stages + 0.6, 1.6]})
    for e in timeline.events:
        colour = _COLOURS.get(e.action.kind)
        if colour is None or e.end <= e.start:
            continue
        ax.barh(e.stage, (e.end - e.start) / size, left=e.start / size, height=0.6, color=colour,
                edgecolor="black", lw=0.3)
        if plan.microbatches <= 16 and e.action.kind in (ActionKind.FORWARD, ActionKind.BACKWARD):
            ax.text((e.start + e.end) / 2 / size, e.stage, str(e.action.microbatch), ha="center", va="center",
                    fontsize=7)
    labels = [f"stage {st.index}" + (" (recompute)" if st.recompute else "") + f"\nranks {','.join(map(str, st.ranks))}"
              for st in plan.stages]
    ax.set_yticks(range(stages), labels, fontsize=8)
    ax.set_ylim(stages - 0.5, -0.5)
    ax.set_xlabel(f"time in one training step ({unit})")
    ax.set_title(f"{title}: {plan.schedule}, {plan.microbatches} microbatches, predicted step "
                 f"{timeline.step_time / size:.3g} {unit}\n(blue forward, orange backward, green gradient "
                 "allreduce, numbers are microbatches)", fontsize=9)
    mem = list(plan.peak_memory_per_rank)
    munit, msize = _scale(mem, _BYTE_UNITS)
    # Muted colours per stage, so memory bars are not read as forward/backward.
    colours = [plt.cm.Set2(plan.stage_of_rank(r) % 8) for r in range(plan.world_size)]
    mx.bar(range(plan.world_size), [b / msize for b in mem], color=colours, width=0.7)
    mx.set_xticks(range(plan.world_size), [f"rank {r}\n(stage {plan.stage_of_rank(r)})"
                                           for r in range(plan.world_size)], fontsize=8)
    mx.set_ylabel(f"planned peak\nmemory ({munit})", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
