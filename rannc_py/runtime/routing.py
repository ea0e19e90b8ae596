"""Which ranks exchange which rows of a batch: pure interval arithmetic.

The plan's row rule (see :mod:`rannc_py.planner.plan`): the global batch is
cut into ``m`` consecutive microbatches of equal size, and replica ``j`` of a
stage with ``r`` replicas holds chunk ``j`` of ``split_sizes(rows, r)`` of
every microbatch. Between two stages with different replica counts a chunk
therefore comes from (or goes to) several peers; these functions say which
rows each pair exchanges. The same arithmetic returns the model's outputs to
the ranks whose local batch they belong to, and :func:`message_tag` names
every message of a step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from rannc_py.planner.plan import split_sizes

ACTIVATION, GRADIENT, OUTPUT = 0, 1, 2
"""Kinds of tensor message: stage outputs forward, their gradients back, model outputs to their ranks."""

META_TAG = 32767 - 1
"""Tag of the (pickled) tensor descriptions a stage sends once per input signature (chunk 0's;
see :func:`meta_tag`)."""


def meta_tag(chunk: int) -> int:
    """The tag of the tensor descriptions crossing a boundary of model chunk ``chunk`` (as in
    :func:`message_tag`): one per chunk, so two chunks' descriptions between the same pair of
    ranks cannot be taken for each other."""
    return META_TAG - chunk % 4


def message_tag(kind: int, microbatch: int, index: int, chunk: int = 0) -> int:
    """The MPI tag of tensor ``index`` of ``microbatch`` in a message of ``kind`` crossing a boundary of
    model chunk ``chunk`` (the sending side's stage of an activation, or of the activation a gradient
    belongs to, divided by the pipeline positions; 0 with one stage per rank).

    With several chunks per rank two boundaries can join the same pair of ranks in the same
    direction (interleaved: stage r to r + 1 and stage r + p to r + p + 1); the chunk keeps their
    messages apart. Matching is otherwise fixed by MPI's in-order delivery per (pair, tag), and
    both sides post one boundary's messages in the same order; distinct tags make mismatches
    loud. The result stays under 32767, the least ``MPI_TAG_UB`` the MPI standard guarantees, and
    apart from :data:`META_TAG` (the chunk counts modulo 4, the microbatch modulo 64, the index
    modulo 32; beyond that in-order delivery alone matches them).
    """
    return (((chunk % 4) * 3 + kind) * 64 + microbatch % 64) * 32 + index % 32


@dataclass(frozen=True)
class Segment:
    """Rows ``[start, stop)`` that ``src`` sends to ``dst``.

    ``start``/``stop`` are in the coordinates the intervals were given in;
    :attr:`src_offset` and :attr:`dst_offset` are where those rows begin in
    the sender's and the receiver's own chunk.
    """

    src: int
    dst: int
    start: int
    stop: int
    src_offset: int
    dst_offset: int

    @property
    def rows(self) -> int:
        """Number of rows exchanged."""
        return self.stop - self.start


def chunks(rows: int, parts: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of each replica's chunk of ``rows`` rows split into ``parts``."""
    out, start = [], 0
    for n in split_sizes(rows, parts):
        out.append((start, start + n))
        start += n
    return out


def overlaps(src: Sequence[tuple[int, int]], dst: Sequence[tuple[int, int]]) -> list[Segment]:
    """Every non-empty intersection of a source interval with a destination interval.

    Args:
        src: ``src[a]`` is the ``(start, stop)`` rows held by source ``a``.
        dst: ``dst[b]`` is the ``(start, stop)`` rows needed by destination ``b``.
    Returns:
        Segments ordered by destination, then by row (the order both sides post
        their messages in).
    """
    out = []
    for b, (d0, d1) in enumerate(dst):
        for a, (s0, s1) in enumerate(src):
            lo, hi = max(s0, d0), min(s1, d1)
            if lo < hi:
                out.append(Segment(a, b, lo, hi, lo - s0, lo - d0))
    return out


def stage_routes(rows: int, src_replicas: int, dst_replicas: int) -> list[Segment]:
    """Row segments of one microbatch of ``rows`` rows from a stage with
    ``src_replicas`` replicas to one with ``dst_replicas`` (replica indices)."""
    return overlaps(chunks(rows, src_replicas), chunks(rows, dst_replicas))


def unbatched_source(rows: int, src_replicas: int, dst_replicas: int, dst: int) -> int:
    """The source replica that sends a tensor without a batch dimension to ``dst``.

    Every source replica holds an identical copy; the one that holds the first
    row of ``dst``'s chunk sends it, so that a pair of replicas exchanging
    rows also carries the unbatched tensors.
    """
    first = chunks(rows, dst_replicas)[dst][0]
    for a, (s0, s1) in enumerate(chunks(rows, src_replicas)):
        if s0 <= first < s1:
            return a
    raise AssertionError(f"row {first} outside a microbatch of {rows} rows")


def output_routes(
    batch: int, microbatches: int, replicas: int, world_size: int
) -> list[tuple[int, Segment]]:
    """How the last stage's outputs reach the rank whose local batch they belong to.

    The global batch of ``batch`` rows is the concatenation of ``world_size``
    equal local batches in rank order. Returns ``(microbatch, segment)`` pairs
    where ``segment.src`` is the last stage's replica index, ``segment.dst`` a
    world rank, ``src_offset`` the row in that replica's chunk of the
    microbatch, and ``dst_offset`` the row in the rank's local batch.
    """
    local = batch // world_size
    rows = batch // microbatches
    dst = [(w * local, (w + 1) * local) for w in range(world_size)]
    out = []
    for i in range(microbatches):
        src = [(i * rows + a, i * rows + b) for a, b in chunks(rows, replicas)]
        out += [(i, seg) for seg in overlaps(src, dst)]
    return out
