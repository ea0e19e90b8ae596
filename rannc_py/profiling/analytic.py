"""Roofline estimate of block times for a device we may not have.

Per op at b rows: forward = params bytes / bandwidth (weights read once) +
b * max(FLOPs per sample / FLOP/s, bytes moved per sample / bandwidth), with
the device's peak FLOP/s and bandwidth scaled by its ``compute_efficiency``
and ``bandwidth_efficiency`` (the fraction real kernels reach; see the presets);
backward is twice the forward (two matrix products per forward one, and
gradients written as well as weights read).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from rannc_py.graph.ir import Graph, canonical_names
from rannc_py.profiling.record import Profile

if TYPE_CHECKING:
    from rannc_py.hardware.cluster import Device


def graph_dtype(graph: Graph) -> torch.dtype:
    """The floating dtype most parameter bytes are in (float32 when there are none)."""
    by: dict[torch.dtype, int] = {}
    for p in graph.params.values():
        if p.dtype.is_floating_point:
            by[p.dtype] = by.get(p.dtype, 0) + p.nbytes
    return max(by, key=lambda k: (by[k], str(k))) if by else torch.float32


def block_params(graph: Graph, block: tuple[int, ...]) -> dict[str, int]:
    """The distinct parameters and buffers the block's ops read: canonical name -> bytes.

    A tied group appears once, under its first name (``Graph.tied_params``).
    """
    canon = canonical_names(graph.tied_params)
    seen: dict[str, int] = {}
    for i in block:
        op = graph.ops[i]
        for f in op.params:
            seen[canon.get(f, f)] = graph.params[f].nbytes
        for f in op.buffers:
            seen[f] = graph.buffers[f].nbytes
    return seen


def block_param_bytes(graph: Graph, block: tuple[int, ...]) -> int:
    """Bytes of the distinct parameters and buffers the block's ops read (tied groups once)."""
    return sum(block_params(graph, block).values())


def act_bytes_per_sample(graph: Graph, block: tuple[int, ...]) -> float:
    """Batch-carrying output bytes per sample of the block's ops: what autograd may keep."""
    return sum(
        t.nbytes for i in block for t in graph.ops[i].outputs if t.batch_dim is not None
    ) / graph.batch_size


def analytic_profile(graph: Graph, blocks: list[tuple[int, ...]], batch_size: int, device: Device) -> Profile:
    """Roofline :class:`Profile` of ``blocks`` on ``device`` (see the module docstring)."""
    peak = device.flops(graph_dtype(graph)) * device.compute_efficiency
    bw = device.memory_bandwidth * device.bandwidth_efficiency
    B = graph.batch_size
    ff, fp, bf, bp, act, pb = [], [], [], [], [], []
    for blk in blocks:
        fixed = per = 0.0
        for i in blk:
            op = graph.ops[i]
            moved = sum(t.nbytes for t in op.inputs) + op.output_bytes
            per += max(op.flops / B / peak, moved / B / bw)
        nparam = block_param_bytes(graph, blk)
        fixed = nparam / bw
        ff.append(fixed)
        fp.append(per)
        bf.append(2 * fixed)
        bp.append(2 * per)
        act.append(act_bytes_per_sample(graph, blk))
        pb.append(nparam)
    return Profile(graph_fingerprint=graph.fingerprint(), batch_size=batch_size, device=device.name,
                   source="analytic", blocks=tuple(blocks), fwd_fixed=tuple(ff), fwd_per_sample=tuple(fp),
                   bwd_fixed=tuple(bf), bwd_per_sample=tuple(bp), act_bytes_per_sample=tuple(act),
                   param_bytes=tuple(pb))
