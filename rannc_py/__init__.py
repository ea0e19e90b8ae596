"""rannc_py: automatic pipeline/data-parallel partitioning for unmodified PyTorch models.

The public API is what this module exports; everything else may change.
Heavy submodules are imported on first use so ``import rannc_py`` stays cheap.
"""

from __future__ import annotations

from rannc_py._lazy import lazy_attributes
from rannc_py.errors import (
    CommError,
    ConfigError,
    NoFeasiblePlanError,
    PartitionError,
    PlanError,
    RaNNCError,
    TraceError,
)

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "trace": "rannc_py.graph.trace",
    "Graph": "rannc_py.graph.ir",
    "TracedGraph": "rannc_py.graph.traced",
    "StagedModule": "rannc_py.graph.staged",
    "profile": "rannc_py.profiling.api",
    "Profile": "rannc_py.profiling.record",
    "Cluster": "rannc_py.hardware.cluster",
    "plan": "rannc_py.frontend",
    "Plan": "rannc_py.planner.plan",
    "PlanOptions": "rannc_py.planner.options",
    "RaNNCModule": "rannc_py.runtime.module",
    "save_checkpoint": "rannc_py.runtime.checkpoint",
    "load_checkpoint": "rannc_py.runtime.checkpoint",
    "consolidate": "rannc_py.runtime.checkpoint",
}

__all__ = [
    "Cluster",
    "CommError",
    "ConfigError",
    "Graph",
    "NoFeasiblePlanError",
    "PartitionError",
    "Plan",
    "PlanError",
    "PlanOptions",
    "Profile",
    "RaNNCError",
    "RaNNCModule",
    "StagedModule",
    "TraceError",
    "TracedGraph",
    "consolidate",
    "load_checkpoint",
    "plan",
    "profile",
    "save_checkpoint",
    "trace",
]


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY)
