"""``rannc_py.plan``: from a model (or its traced graph) to a :class:`~rannc_py.planner.plan.Plan`.

This is the one planning entry that may hold a model: it traces a module
when given one, measures its blocks here when it plans for the ``local``
preset with example inputs, finds the tensor splits of the traced program
(:func:`rannc_py.graph.tensor_annotate.tensor_annotation`, at the pinned
``tensor`` degree or at every degree tried when it is searched), and hands
the planner (:func:`rannc_py.planner.api.plan_graph`) only the pure-data
graph, a profile and that annotation.
"""

from __future__ import annotations

from typing import Any

import torch

from rannc_py.errors import ConfigError
from rannc_py.graph.ir import Graph
from rannc_py.graph.tensor_annotate import DEGREES, annotate
from rannc_py.graph.trace import trace
from rannc_py.graph.traced import TracedGraph
from rannc_py.hardware.cluster import Cluster
from rannc_py.planner.api import plan_cluster, plan_graph
from rannc_py.planner.options import PlanOptions
from rannc_py.planner.plan import Plan
from rannc_py.profiling.api import profile as make_profile
from rannc_py.profiling.record import Profile


def plan(
    model_or_graph: torch.nn.Module | Graph,
    args: tuple[Any, ...] = (),
    kwargs: dict[str, Any] | None = None,
    *,
    batch_size: int,
    cluster: Cluster | str,
    profile: Profile | None = None,
    **options: Any,
) -> Plan:
    """Find the fastest data/tensor/pipeline layout of a model on a cluster that fits every device's memory.

    Every device of the cluster is used: stages are replicated (whole
    pipelines and single stages) to fill them; per-stage replicas need not be
    powers of two.

    Args:
        model_or_graph: an ``nn.Module`` (traced with ``args``/``kwargs``) or
            a graph from :func:`rannc_py.trace`.
        args, kwargs: example inputs for tracing (and for measuring on "local").
        batch_size: global batch per step.
        cluster: a :class:`Cluster` or preset string ("a64fx:nodes=256", "local:ranks=4").
        profile: a :class:`Profile` to use; default: measured here for the
            "local" preset when ``args``/``kwargs`` are given, analytic otherwise.
        **options: the planning options of :class:`rannc_py.PlanOptions`
            (``memory_limit``, ``memory_margin``, ``schedules``,
            ``max_stages``, ``num_stages``, ``replicas``, ``microbatches``,
            ``recompute``, ``optimizer``, ``update_cost``, ``return_outputs``,
            ``shard_optimizer``, ``tensor``), each with the default documented
            there. Tensor degrees are searched only for a module or the graph
            :func:`rannc_py.trace` returned (their program says what splits);
            a plain data Graph plans at degree 1.
    Returns:
        The :class:`Plan`; deterministic for the same inputs.
    Raises:
        ConfigError: an unknown option or a bad value, batch size, pin or preset.
        PlanError: ``profile`` was made for another graph.
        NoFeasiblePlanError: nothing fits; the message gives the smallest
            per-device memory that would and the layout that needs it.
    """
    opts = PlanOptions.from_kwargs({**options, "cluster": cluster})
    cl = plan_cluster(opts)
    if isinstance(model_or_graph, Graph):
        graph = model_or_graph
    else:
        graph = trace(model_or_graph, tuple(args), kwargs)
    if profile is None and cl.device.name == "local" and (args or kwargs):
        if not isinstance(graph, TracedGraph):
            raise ConfigError("measuring the model for the 'local' preset needs the graph rannc_py.trace() "
                              f"returned, not a {type(graph).__name__} without its program; pass that graph, "
                              "or no example inputs to plan from the analytic profile")
        profile = make_profile(graph, graph.batch_size, inputs=graph.flatten_inputs(tuple(args), kwargs))
    annotation = annotate(graph, opts.tensor, DEGREES)
    data = graph.data() if isinstance(graph, TracedGraph) else graph  # the planner sees only pure data
    return plan_graph(data, batch_size, opts, profile=profile, cluster=cl, tensor=annotation)

