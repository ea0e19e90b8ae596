"""Tensor parallelism in chain terms: a chain's blocks as one rank of a tensor group sees them.

A layout of tensor degree ``t`` runs every stage on tensor groups of ``t``
consecutive ranks (the Plan format: replica j of a stage is
``ranks[j*t:(j+1)*t]``), so a pipeline of P devices is P / t groups and the
search runs on ``D / t`` "devices" that are groups. :func:`tensor_chain`
turns the graph's :class:`~rannc_py.graph.tensor_cost.DegreeCosts` into
what one rank of a group pays per block:

* time: each block's forward and backward (fixed and per sample) scaled by
  ``1 - f + f / t``, ``f`` the share of the block's work in split ops, the
  work of an op weighed as its roofline time on the device (FLOPs at peak
  plus the bytes it reads and writes at the memory bandwidth); replicated
  ops are paid in full;
* memory: a sharded parameter takes ``1/t`` of its bytes (so do its
  gradient and optimizer state, and the largest-parameter temporary); the
  saved activations scale by ``1 - a + a / t``, ``a`` the split share of the
  block's output bytes; a cut after a block whose outputs are all split
  crosses at ``1/t`` of its bytes per rank (each rank sends its own part,
  otherwise each rank sends its whole copy to the same position of the next
  stage's group: a boundary is charged once per tensor rank);
* the group's collectives (:class:`GroupCollectives`), per block, priced by
  :meth:`GroupCollectives.block_times` with the alpha-beta formulas of
  :mod:`rannc_py.comm.cost` on the group's link: inside a node (NVLink on the
  GPU presets) when ``t`` divides the devices per node, else between nodes
  (on ``a64fx``, one rank per node, the Tofu link to the neighbouring
  nodes). Each collective also pays the link's posting overhead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from rannc_py.comm.cost import allgather_time, best_allreduce
from rannc_py.graph.ir import Graph
from rannc_py.graph.tensor_cost import DegreeCosts, GroupCollective
from rannc_py.hardware.cluster import Cluster, Link
from rannc_py.hardware.device import Device
from rannc_py.planner.chain import Chain


def group_link(cluster: Cluster, degree: int) -> Link:
    """The link a tensor group of ``degree`` consecutive ranks talks over: inside a node when
    groups fit nodes exactly (``degree`` divides the devices per node), else between nodes."""
    dpn = cluster.devices_per_node
    return cluster.intra_node if degree <= dpn and dpn % degree == 0 else cluster.inter_node


@dataclass(frozen=True)
class GroupCollectives:
    """The tensor group's collectives of each block of a chain (see the module docstring).

    Attributes:
        degree: the group size t.
        forward: per block, the collectives its forward ends with.
        backward: per block, the collectives of its backward.
    """

    degree: int
    forward: tuple[tuple[GroupCollective, ...], ...]
    backward: tuple[tuple[GroupCollective, ...], ...]

    def collective_time(self, c: GroupCollective, rows: int, link: Link) -> float:
        """Seconds of one block collective at ``rows`` rows on ``link`` (all its messages)."""
        nbytes = (c.fixed_bytes + c.per_sample_bytes * rows) / c.messages
        if nbytes <= 0:
            return 0.0
        t = self.degree
        if c.kind == "allgather":
            one = allgather_time(nbytes, t, alpha=link.latency, beta=link.bandwidth, algorithm="mpi")
        else:
            one = best_allreduce(nbytes, t, alpha=link.latency, beta=link.bandwidth)[1]
        return c.messages * (one + 2 * link.overhead)

    def block_times(self, rows: int, link: Link) -> tuple[np.ndarray, np.ndarray]:
        """(forward, backward) collective seconds per block at ``rows`` rows per replica."""
        fwd = np.array([sum(self.collective_time(c, rows, link) for c in cs) for cs in self.forward])
        bwd = np.array([sum(self.collective_time(c, rows, link) for c in cs) for cs in self.backward])
        return fwd, bwd


@dataclass(frozen=True)
class TensorChain:
    """A chain as one rank of a tensor group of ``degree`` sees it, and the group's collectives."""

    degree: int
    chain: Chain
    collectives: GroupCollectives
    sharded_params: tuple[str, ...]


def _op_weight(graph: Graph, i: int, device: Device) -> float:
    op = graph.ops[i]
    peak = device.flops("float32") * device.compute_efficiency
    moved = sum(t.nbytes for t in op.inputs) + op.output_bytes
    return op.flops / peak + moved / (device.memory_bandwidth * device.bandwidth_efficiency)


def tensor_chain(graph: Graph, chain: Chain, costs: DegreeCosts, device: Device) -> TensorChain:
    """The :class:`TensorChain` of ``chain`` (built from ``graph``) at the degree of ``costs``."""
    t = costs.degree
    split = set(costs.split_ops)
    split_bytes = dict(costs.split_bytes)
    sharded = set(costs.sharded_params)
    block_of = {op: b for b, blk in enumerate(chain.blocks) for op in blk.ops}
    fwd: list[list[GroupCollective]] = [[] for _ in chain.blocks]
    bwd: list[list[GroupCollective]] = [[] for _ in chain.blocks]
    for c in costs.collectives:
        b = block_of.get(c.op, chain.n - 1)
        (bwd if c.backward else fwd)[b].append(c)
    blocks = []
    for blk in chain.blocks:
        weights = [_op_weight(graph, i, device) for i in blk.ops]
        total = sum(weights)
        f = sum(w for i, w in zip(blk.ops, weights) if i in split) / total if total > 0 else 0.0
        scale = 1 - f + f / t
        out_total = sum(graph.ops[i].output_bytes for i in blk.ops)
        a = sum(split_bytes.get(i, 0) for i in blk.ops) / out_total if out_total > 0 else 0.0
        last = blk.ops[-1] if blk.ops else None
        last_split = last is not None and graph.ops[last].output_bytes > 0 and \
            split_bytes.get(last, 0) >= graph.ops[last].output_bytes
        blocks.append(replace(
            blk, fwd_fixed=blk.fwd_fixed * scale, fwd_per_sample=blk.fwd_per_sample * scale,
            bwd_fixed=blk.bwd_fixed * scale, bwd_per_sample=blk.bwd_per_sample * scale,
            act_bytes=blk.act_bytes * (1 - a + a / t), out_bytes=blk.out_bytes / t if last_split else blk.out_bytes,
            params=tuple((name, math.ceil(nb / t) if name in sharded else nb) for name, nb in blk.params)))
    coll = GroupCollectives(degree=t, forward=tuple(tuple(x) for x in fwd), backward=tuple(tuple(x) for x in bwd))
    return TensorChain(degree=t, chain=replace(chain, blocks=tuple(blocks)), collectives=coll,
                       sharded_params=costs.sharded_params)
