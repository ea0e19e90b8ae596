"""Tracing a model into the Graph IR, and cutting the graph into stages.

``rannc_py.graph.trace.trace`` captures a model; ``rannc_py.graph.ir`` holds
the IR (:class:`Graph`, :class:`Op`, :class:`TensorMeta`, :class:`ParamInfo`);
``rannc_py.graph.staged`` builds the per-stage modules (:class:`Stage`,
:class:`StagedModule`). The public names are exported by ``rannc_py``.
"""
