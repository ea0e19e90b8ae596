"""Per-block costs of a traced model: measured on this process's device, or analytic.

``rannc_py.profile(graph, batch_size, device=None)`` (:mod:`.api`) returns a
:class:`Profile` (:mod:`.record`). With ``device=None`` it times every block's
forward and backward here (:mod:`.measure`: warm-up, repeats, median; results
cached on disk by graph fingerprint, batch size, device and blocks). With a
device preset or :class:`~rannc_py.hardware.cluster.Cluster` it estimates times
by roofline from the graph's FLOPs and bytes (:mod:`.analytic`). Both give the
same type; blocks come from :func:`rannc_py.profiling.coarsen.coarsen`.

Only ``api`` and ``measure`` run models; the planner imports ``record``,
``analytic`` and ``coarsen``, which read the pure :class:`~rannc_py.graph.ir.Graph`
alone. The names below are loaded on first use, so importing this package
loads neither.
"""

from __future__ import annotations

from rannc_py._lazy import lazy_attributes

_LAZY = {"Profile": "rannc_py.profiling.record", "profile": "rannc_py.profiling.api"}

__all__ = ["Profile", "profile"]


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY)
