"""The planner's own simulated timeline of the plan a run used.

A :class:`rannc_py.Plan` made by the planner records the per-stage costs it
simulated, so :meth:`rannc_py.Plan.timeline` replays the plan's real action
lists with them: the picture is the timeline behind ``plan.step_time``, not an
approximation of it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rannc_py.graph.ir import Graph
    from rannc_py.planner.plan import Plan
    from rannc_py.schedule import Timeline


def planned_timeline(plan: Plan, graph: Graph) -> Timeline:
    """Simulate one step of ``plan`` with the planner's per-stage costs.

    Takes the plan and the traced graph the run used (``rannc_py.trace`` of
    the model on one rank's batch, as the runtime traces it). Returns the
    :class:`Timeline`; its ``step_time`` equals ``plan.step_time``. Raises
    ``ValueError`` when the graph is not the one the plan was made for, and
    ``rannc_py.PlanError`` when the plan records no stage costs (a
    hand-written layout).
    """
    if graph.fingerprint() != plan.graph_fingerprint:
        raise ValueError(
            f"the graph (fingerprint {graph.fingerprint()[:12]}) is not the one the plan was made for "
            f"({plan.graph_fingerprint[:12]}); trace the same model on the same per-rank batch shape"
        )
    return plan.timeline()
