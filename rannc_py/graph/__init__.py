"""Tracing a model into the Graph IR, and cutting the traced program into stages.

The modules, bottom to top (each imports only those below it):

``ir``          the pure-data IR: :class:`Graph`, :class:`Op`,
                :class:`TensorMeta`, :class:`ParamInfo`, ``canonical_names``
``partition``   op-to-stage assignments (valid, FLOP-balanced) over a Graph
``layout``      how a call's arguments and the model's output flatten
``flops``       FLOP estimates per ATen op
``symbolic``    recomputing symbolic sizes inside a stage
``tensor_rules``  how each kind of op carries a tensor split (:class:`Shard`)
``lowered``     the exported program classified (:class:`Program`) and the
                Graph built from it (``lower``); ``tied_groups`` of a model
``tensor_cost``  what a tensor split changes in a Graph's costs, as pure data (:class:`TensorAnnotation`)
``tensor_split``  which ops of a Program run split over a tensor group (:class:`TensorSplit`)
``tensor_annotate``  a traced graph's :class:`TensorAnnotation` from its splits at several degrees
``staged``      stage modules cut from a Program (:class:`Stage`, :class:`StagedModule`)
``tensor_program``  per-rank programs of a tensor split, collectives through a group object
``traced``      :class:`TracedGraph`: a Graph plus its Program
``trace``       ``trace(model, args, kwargs)`` -> TracedGraph

The public names are exported by ``rannc_py``.
"""
