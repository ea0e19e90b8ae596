"""A traced model: the pure-data :class:`~rannc_py.graph.ir.Graph` plus the program that runs it.

:func:`rannc_py.trace` returns a :class:`TracedGraph`. The profiler and the
planner read only its :class:`Graph` side (a TracedGraph *is* a Graph);
cutting it into stages (:meth:`TracedGraph.split`), flattening a call's
arguments and rebuilding the model's output need the traced program (the
exported fx module and the model's own parameters), which
:meth:`TracedGraph.data` leaves out.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from rannc_py.graph.ir import Graph
from rannc_py.graph.lowered import Program
from rannc_py.graph.partition import resolve_assignment
from rannc_py.graph.staged import StagedModule


def _data_fields(graph: Graph) -> dict[str, Any]:
    """The constructor arguments of ``graph``'s pure-data part."""
    return {f.name: getattr(graph, f.name) for f in dataclasses.fields(Graph) if f.init}


@dataclass(kw_only=True, repr=False, eq=False)
class TracedGraph(Graph):
    """A :class:`Graph` together with its executable traced program.

    Attributes:
        program: the :class:`~rannc_py.graph.lowered.Program` (exported fx
            module, the traced model, its node classification). Not data: it
            is left out of :meth:`data`, equality and serialisation.
    """

    program: Program = field(compare=False)

    @classmethod
    def from_parts(cls, graph: Graph, program: Program) -> TracedGraph:
        """A TracedGraph of ``graph``'s data (shared, not copied) and ``program``; raises nothing."""
        return cls(program=program, **_data_fields(graph))

    @property
    def model(self) -> nn.Module:
        """The traced ``nn.Module`` (the user's model; the stages share its parameters)."""
        return self.program.model

    def data(self) -> Graph:
        """A plain :class:`Graph` copy of this graph's data, without the program.

        The copy shares nothing with this object, pickles, and serialises with
        :meth:`Graph.to_json`; its fingerprint equals this graph's.
        """
        return Graph(**copy.deepcopy(_data_fields(self)))

    def flatten_inputs(self, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None) -> dict[str, torch.Tensor]:
        """Flatten a call's ``args``/``kwargs`` into ``{input name: tensor}``.

        The structure and the non-tensor values (e.g. ``use_cache=False``) must
        match the traced call; raises ConfigError if they do not.
        """
        return self.program.flatten_inputs(args, kwargs)

    def unflatten_outputs(self, values: Sequence[torch.Tensor]) -> Any:
        """Rebuild the model's output (tensor, tuple, dict, ModelOutput...) from
        its flattened tensors, given in ``output_names`` order. Raises
        ConfigError on a wrong count."""
        return self.program.unflatten_outputs(values)

    def split(self, stages: int | Sequence[int] | Mapping[str, int]) -> StagedModule:
        """Split the graph into pipeline stages that run in this process.

        Takes a stage count (ops are cut into that many contiguous runs with
        balanced FLOPs), a sequence giving the stage of each op by index, or a
        dict op name -> stage. Stage indices must be 0..S-1, each used, and
        every edge must go from a stage to the same or a later one.

        Returns a :class:`StagedModule` bound to the traced model's own
        parameters. Raises PartitionError for an invalid split, naming the
        offending edge or value.
        """
        return StagedModule(self, self.program, resolve_assignment(self, stages))
