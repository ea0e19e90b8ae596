"""The planner's own simulated timeline of the plan a run used.

A :class:`rannc_py.Plan` keeps the predicted step time but not the per-stage
costs the planner simulated to get it. They are re-derived here exactly as the
planner derived them: the same graph (checked by fingerprint), the same
cluster preset (the plan records it), the same analytic profile and cost
model, and the plan's stage boundaries, replicas and recompute flags. The
schedule simulator then replays the plan's real action lists, so the picture
is the timeline behind ``plan.step_time``, not an approximation of it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rannc_py.schedule import Timeline, simulate

if TYPE_CHECKING:
    from rannc_py.graph.ir import Graph
    from rannc_py.planner.plan import Plan


def cluster_spec(plan: Plan) -> str:
    """The cluster preset string the plan was made for, e.g. ``"local:ranks=4,memory=8MiB"``.

    Raises ``ValueError`` for a plan that records no preset (a hand-written layout).
    """
    from rannc_py.errors import ConfigError
    from rannc_py.planner.cluster import parse_cluster

    # Cluster.describe() writes "<preset string>: <devices, links ...>".
    spec = plan.cluster.partition(": ")[0]
    try:
        parse_cluster(spec)
    except ConfigError as e:
        raise ValueError(f"the plan records no cluster preset (cluster={plan.cluster!r}), so it has no "
                         "predicted timeline; make the plan with the planner") from e
    return spec


def planned_timeline(plan: Plan, graph: Graph) -> Timeline:
    """Simulate one step of ``plan`` with the planner's per-stage costs.

    Takes the plan and the traced graph it was made for (``rannc_py.trace``
    of the model on one rank's batch, as the runtime traces it). Returns the
    simulated :class:`Timeline`; its ``step_time`` equals ``plan.step_time``
    for a plan the planner chose. Raises ``ValueError`` when the graph is not
    the one the plan was made for, or the plan records no cluster preset.
    """
    from rannc_py.planner.api import chain_from_graph
    from rannc_py.planner.cluster import parse_cluster
    from rannc_py.planner.cost import CostModel
    from rannc_py.planner.search import Layout, stage_costs
    from rannc_py.profiling import profile

    if graph.fingerprint() != plan.graph_fingerprint:
        raise ValueError(
            f"the graph (fingerprint {graph.fingerprint()[:12]}) is not the one the plan was made for "
            f"({plan.graph_fingerprint[:12]}); trace the same model on the same per-rank batch shape"
        )
    cluster = parse_cluster(cluster_spec(plan))
    # The runtime plans from the graph alone, which gives the analytic profile.
    chain = chain_from_graph(graph, profile(graph, graph.batch_size, cluster))
    # Optimizer and memory margin only change memory, not the stage costs drawn here.
    cost = CostModel(chain, cluster, plan.batch_size, "adam", 0.1)
    first_block = {blk.ops[0]: k for k, blk in enumerate(chain.blocks)}
    bounds = (*(first_block[st.ops[0]] for st in plan.stages), chain.n)
    layout = Layout(1, plan.microbatches, plan.schedule, bounds, tuple(st.replicas for st in plan.stages),
                    tuple(st.recompute for st in plan.stages), 0.0, tuple(0.0 for _ in plan.stages))
    return simulate(plan.make_schedule(), stage_costs(cost, layout))
