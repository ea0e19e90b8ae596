"""Pipeline schedules as data: per-stage action lists, their checks and their simulation."""

from rannc_py.schedule.actions import Action, ActionKind, Schedule, parse_action
from rannc_py.schedule.generators import (
    SCHEDULES,
    by_name,
    forward_only,
    gpipe,
    one_f_one_b,
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
    "one_f_one_b",
    "parse_action",
    "simulate",
    "validate",
]
