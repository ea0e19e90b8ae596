"""Time every block's forward and backward in this process.

The graph is cut at the block boundaries (``TracedGraph.split``) and the stages run
in order on example inputs; each block's forward and backward is timed after
one warm-up run, ``repeats`` times, keeping the median. This is done at two
batch sizes, b and b // 2, and the line ``t(rows) = fixed + per_sample * rows``
is fitted through the two medians (fixed: per-call overheads and weight reads
that do not grow with rows). A fit with a negative part is clamped (noise on a
tiny block): a negative fixed term becomes 0 with the line through the origin
and the b point, a negative slope becomes a constant time. When the graph runs
at one batch size only (``dynamic_batch`` false) or b is 1, the single point
gives ``fixed = 0``.

Measuring leaves the model as it was: the backward passes compute the
parameters' gradients without adding them to ``.grad``, buffers that a
forward updates (BatchNorm's running statistics) are restored afterwards,
and the random number generator is forked, so a later training step is the
one it would have been without planning.

With one torch thread the clock is the process's CPU time, not the wall
clock: on a machine shared with other work, a block descheduled for a while
would otherwise be recorded (and cached) as that much slower. With more
threads CPU time would add up the threads, so the wall clock is used.
"""

from __future__ import annotations

import contextlib
import functools
import statistics
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

from rannc_py._util import clock, median_time
from rannc_py.errors import ConfigError
from rannc_py.profiling.analytic import act_bytes_per_sample, block_param_bytes
from rannc_py.profiling.record import Profile

if TYPE_CHECKING:
    from rannc_py.graph.traced import TracedGraph


def _resize(inputs: dict[str, torch.Tensor], old: int, new: int) -> dict[str, torch.Tensor]:
    out = {}
    for k, t in inputs.items():
        if t.dim() > 0 and t.shape[0] == old and old != new:
            reps = -(-new // old)
            t = t.repeat(reps, *([1] * (t.dim() - 1)))[:new]
        out[k] = t
    return out


def measure_profile(graph: TracedGraph, blocks: list[tuple[int, ...]], batch_size: int,
                    inputs: dict[str, torch.Tensor], device: str, repeats: int) -> Profile:
    """Measured :class:`Profile` of ``blocks`` at ``batch_size`` rows (see the module docstring).

    Raises:
        ConfigError: parameters on the meta device, or a batch size the graph cannot run at.
    """
    if any(p.is_meta for p in graph.model.parameters()):
        raise ConfigError("cannot time a model whose parameters are on the meta device; "
                          "materialize it or pass device='<preset>' for an analytic profile")
    if batch_size != graph.batch_size and not graph.dynamic_batch:
        raise ConfigError(f"graph was traced with a fixed batch of {graph.batch_size}; "
                          f"cannot measure at batch_size={batch_size}")
    assignment = [0] * len(graph.ops)
    for b, blk in enumerate(blocks):
        for i in blk:
            assignment[i] = b
    staged = graph.split(assignment)
    sizes = [batch_size] + ([batch_size // 2] if graph.dynamic_batch and batch_size >= 2 else [])
    with _untouched(graph.model):
        timed = [_time_blocks(staged, _resize(inputs, graph.batch_size, rows), repeats, rows) for rows in sizes]
    # the weight-gradient share at the full batch: backward without the input gradients' part
    weight = tuple(min(1.0, max(0.0, w / b)) if b > 0 else 0.0 for w, b in zip(timed[0][2], timed[0][1]))
    fits = [_fit(sizes, [t[0][k] for t in timed]) for k in range(len(blocks))]
    fits_b = [_fit(sizes, [t[1][k] for t in timed]) for k in range(len(blocks))]
    return Profile(
        graph_fingerprint=graph.fingerprint(), batch_size=batch_size, device=device, source="measured",
        blocks=tuple(blocks),
        fwd_fixed=tuple(f for f, _ in fits), fwd_per_sample=tuple(p for _, p in fits),
        bwd_fixed=tuple(f for f, _ in fits_b), bwd_per_sample=tuple(p for _, p in fits_b),
        act_bytes_per_sample=tuple(act_bytes_per_sample(graph, b) for b in blocks),
        param_bytes=tuple(block_param_bytes(graph, b) for b in blocks),
        bwd_weight_fraction=weight,
    )


@contextlib.contextmanager
def _untouched(model: torch.nn.Module) -> Iterator[None]:
    """Restore ``model``'s buffers and the random number generator's state on exit."""
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            with torch.no_grad():
                for buf, value in saved:
                    buf.copy_(value)


def _fit(rows: list[int], times: list[float]) -> tuple[float, float]:
    """(fixed, per_sample) through the measured points (see the module docstring)."""
    b, t = rows[0], times[0]
    if len(rows) == 1:
        return 0.0, t / b
    slope = (t - times[1]) / (b - rows[1])
    fixed = t - slope * b
    if slope < 0:
        return t, 0.0
    if fixed < 0:
        return 0.0, t / b
    return fixed, slope


def _time_blocks(staged, values: dict[str, torch.Tensor], repeats: int,
                 rows: int) -> tuple[list[float], list[float], list[float]]:
    """Median forward and backward seconds of every stage of ``staged`` at ``rows`` rows, and of
    the backward's weight-gradient part (the full backward less one computing only the
    gradients of the stage's activation inputs; all of it for a stage without such inputs)."""
    values = dict(values)
    fwd, bwd, weight = [], [], []
    for stage in tqdm(staged.stages, desc=f"profiling blocks at {rows} rows", leave=False):
        args = []
        for name in stage.input_names:
            t = values[name]
            if name in stage.activation_inputs and t.is_floating_point():
                t = t.detach().requires_grad_()
            args.append(t)

        def run_fwd(stage=stage, args=args):
            return stage.module(*args)

        fwd.append(median_time(run_fwd, repeats))
        outs = run_fwd()
        grads_needed = [o for o in outs if isinstance(o, torch.Tensor) and o.requires_grad]

        # the gradients of the stage's activation inputs and parameters, as a
        # training backward computes them, returned instead of added to .grad
        wrt = [a for a in args if a.requires_grad] + [p for p in stage.module.parameters() if p.requires_grad]

        def run_bwd(stage=stage, args=args, wrt=wrt):
            outs = [o for o in stage.module(*args) if isinstance(o, torch.Tensor) and o.requires_grad]
            t0 = clock()
            if outs and wrt:
                torch.autograd.grad(outs, wrt, [torch.ones_like(o) for o in outs], allow_unused=True)
            return clock() - t0

        acts = [a for a in args if a.requires_grad]
        has_params = any(p.requires_grad for p in stage.module.parameters())
        if grads_needed:
            run_bwd()
            bwd.append(statistics.median(run_bwd() for _ in range(repeats)))
            if not has_params:
                weight.append(0.0)
            elif not acts:
                weight.append(bwd[-1])
            else:
                run_input = functools.partial(run_bwd, wrt=acts)
                run_input()
                weight.append(max(0.0, bwd[-1] - statistics.median(run_input() for _ in range(repeats))))
        else:
            bwd.append(0.0)
            weight.append(0.0)
        values.update(zip(stage.output_names, (o.detach() for o in outs)))
    return fwd, bwd, weight
