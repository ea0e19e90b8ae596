"""Pipeline schedules as data: per-rank action lists, their checks and their simulation."""

from rannc_py.schedule.actions import Action, ActionKind, Schedule, parse_action
from rannc_py.schedule.generators import (
    SCHEDULES,
    by_name,
    forward_only,
    gpipe,
    in_flight_bound,
    interleaved,
    one_f_one_b,
    zb_h1,
    zb_v,
)
from rannc_py.schedule.simulate import Event, StageCosts, Timeline, simulate
from rannc_py.schedule.validate import validate

__all__ = [
    "SCHEDULES",
    "Action",
    "ActionKind",
    "Event",
    "Schedule",
    "StageCosts",
    "Timeline",
    "by_name",
    "forward_only",
    "gpipe",
    "in_flight_bound",
    "interleaved",
    "one_f_one_b",
    "parse_action",
    "simulate",
    "validate",
    "zb_h1",
    "zb_v",
]
