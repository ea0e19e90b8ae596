"""Plan: JSON round-trip, atomic save/load, assignment, rank lookup, summary, checks."""

from __future__ import annotations

import dataclasses

import pytest

from rannc_py.errors import PlanError
from rannc_py.planner.plan import Plan, StagePlan, split_sizes


def sample_plan(**over) -> Plan:
    stages = (
        StagePlan(0, (0, 1, 2), ("emb.weight", "h.0.w"), (0, 1), False, 0.1234567890123, 1000, "torus"),
        StagePlan(1, (3, 4), ("h.1.w", "emb.weight"), (2,), True, 1 / 3, 2**31 + 7),
    )
    kw = {"batch_size": 8, "microbatches": 2, "schedule": "1f1b", "stages": stages, "world_size": 3,
          "graph_fingerprint": "abc", "cluster": "local:ranks=3", "step_time": 0.1 + 0.2,
          "peak_memory_per_rank": (1000, 1000, 2**31 + 7), "samples_per_second": 8 / 0.3, "mfu": 0.123,
          "search_time": 0.01}
    kw.update(over)
    return Plan(**kw)


def test_round_trip_exact(tmp_path):
    p = sample_plan()
    assert Plan.from_json(p.to_json()) == p
    path = tmp_path / "plan.json"
    p.save(path)
    assert Plan.load(path) == p
    assert [f.name for f in tmp_path.iterdir()] == ["plan.json"]  # no temp file left behind


def test_allreduce_field_defaults_to_mpi_in_older_plans():
    import json

    p = sample_plan()
    d = json.loads(p.to_json())
    assert [s["allreduce"] for s in d["stages"]] == ["torus", "mpi"]
    for s in d["stages"]:
        del s["allreduce"]  # a plan written before the field existed
    assert [s.allreduce for s in Plan.from_dict(d).stages] == ["mpi", "mpi"]
    with pytest.raises(PlanError, match="unknown allreduce algorithm 'tree'"):
        dataclasses.replace(p, stages=(dataclasses.replace(p.stages[0], allreduce="tree"), p.stages[1]))


def test_queries():
    p = sample_plan()
    assert p.assignment() == [0, 0, 0, 1, 1]
    assert [p.stage_of_rank(r) for r in range(4)] == [0, 0, 1, None]
    assert p.replica_of_rank(1) == 1 and p.replica_of_rank(2) == 0
    assert p.make_schedule().num_stages == 2 and p.make_schedule().num_microbatches == 2
    text = p.summary()
    assert "0-1 (x2)" in text and "1f1b" in text and "yes" in text and "torus" in text


def test_split_sizes():
    assert split_sizes(10, 3) == [4, 3, 3]
    assert split_sizes(4, 4) == [1, 1, 1, 1]


@pytest.mark.parametrize(
    "over,match",
    [
        ({"microbatches": 3}, "multiple of microbatches"),
        ({"world_size": 4, "peak_memory_per_rank": (0,) * 4}, "uses 3 ranks but world_size is 4"),
        ({"schedule": "zb"}, "unknown schedule"),
        ({"batch_size": 2}, "every replica needs at least one"),
    ],
)
def test_invalid_plans(over, match):
    with pytest.raises(PlanError, match=match):
        sample_plan(**over)


def test_overlapping_ranks_and_bad_ops():
    p = sample_plan()
    bad = dataclasses.replace(p.stages[1], ranks=(1,))
    with pytest.raises(PlanError, match="held by another stage"):
        dataclasses.replace(p, stages=(p.stages[0], bad))
    gap = dataclasses.replace(p.stages[1], ops=(3, 5))
    with pytest.raises(PlanError, match="op 5"):
        dataclasses.replace(p, stages=(p.stages[0], gap)).assignment()


def test_malformed_json():
    with pytest.raises(PlanError, match="does not parse"):
        Plan.from_json("{")
    with pytest.raises(PlanError, match="malformed plan"):
        Plan.from_json('{"batch_size": 1}')
