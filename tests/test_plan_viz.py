"""The plan picture (``python -m rannc_py plan --png`` and the examples): units, labels, colours, legend."""

from __future__ import annotations

import matplotlib
import pytest
from matplotlib.colors import to_rgba
from test_plan_data import sample_plan, searched_plan, synthetic_chain

from rannc_py.errors import PlanError
from rannc_py.planner.viz import _BYTE_UNITS, draw_plan, plan_figure, rank_range, unit
from rannc_py.schedule import simulate

matplotlib.use("Agg")
import matplotlib.pyplot as plt

FORBIDDEN = {to_rgba("tab:blue"), to_rgba("tab:orange")}  # forward / backward in the Gantt chart


def memory_bar_colours(mx) -> set[tuple[float, ...]]:
    return {tuple(patch.get_facecolor()) for patch in mx.patches}


def test_units():
    assert unit([3 * 2**20, 5 * 2**20], _BYTE_UNITS) == ("MiB", 2**20)
    assert unit([27 * 2**30], _BYTE_UNITS) == ("GiB", 2**30)
    assert unit([0.0], _BYTE_UNITS) == ("B", 1.0)


def test_few_ranks_one_bar_each(tmp_path):
    p, _ = searched_plan(synthetic_chain(4, True), "a64fx:nodes=4", 16, num_stages=2)
    fig = plan_figure(p, title="tiny")
    try:
        ax, mx = fig.axes
        assert max(p.peak_memory_per_rank) < 2**30 and "MiB" in mx.get_ylabel()
        assert [int(t) for t in mx.get_xticks()] == list(range(p.world_size))
        assert len(mx.patches) == p.world_size
        assert not memory_bar_colours(mx) & FORBIDDEN
        labels = [t.get_text() for t in ax.get_yticklabels()]
        assert labels[0].startswith("stage 0 (") and len(labels) == p.num_stages
        legend = {t.get_text() for t in ax.get_legend().get_texts()}
        assert {"forward", "backward", "gradient allreduce + optimizer step"} <= legend
        assert mx.get_legend() is not None
    finally:
        plt.close(fig)
    assert draw_plan(p, tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_many_stages_and_ranks_bar_per_replica_group(tmp_path):
    chain = synthetic_chain(64, False)
    p, _ = searched_plan(chain, "a64fx:nodes=128", 128, num_stages=64, microbatches=8)
    assert p.num_stages == 64 and p.world_size == 128
    fig = plan_figure(p)
    try:
        ax, mx = fig.axes
        assert max(p.peak_memory_per_rank) > 2**30 and "GiB" in mx.get_ylabel()
        assert len(mx.patches) == p.num_stages  # one bar per stage replica group
        assert all(float(t).is_integer() for t in mx.get_xticks())
        assert not memory_bar_colours(mx) & FORBIDDEN
        labels = [t.get_text() for t in ax.get_yticklabels()]
        assert 16 <= len(labels) <= 32 and labels[0] == f"stage 0 ({rank_range(p.stages[0])})"
    finally:
        plt.close(fig)


def test_rank_range():
    p = sample_plan()
    assert rank_range(p.stages[0]) == "ranks 0-1" and rank_range(p.stages[1]) == "rank 2"


def test_plan_without_costs(tmp_path):
    p = sample_plan()
    with pytest.raises(PlanError, match="no timeline"):
        draw_plan(p, tmp_path / "p.png")
    # A timeline given explicitly is drawn (here the zero-cost simulation of the schedule).
    tl = simulate(p.make_schedule())
    assert draw_plan(p, tmp_path / "p.png", timeline=tl).stat().st_size > 0
