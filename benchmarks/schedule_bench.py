"""Schedule benchmark: predicted throughput of every schedule at one layout, on A64FX.

For the GPT-13B and Fugaku-LLM-shape rows (40 decoder layers, hidden 5120,
sequence 2048, one sample per microbatch, 8 pipeline ranks of 5 layers;
GPT-13B with 32 microbatches per pipeline, Fugaku-LLM's hand layout with 7),
every layer costs the same, so the stages are synthetic equal stages rather
than a traced model: per layer and sample, forward ``2 * (12 h^2 + 2 s h) * s``
FLOPs at the A64FX preset's peak, a full backward twice that, of which the
weight gradients are one forward's worth (each weight-gradient product mirrors
a forward product); activations cross a stage boundary over one Tofu-D link
(the preset's latency and bandwidth). The gradient allreduce and the optimizer
step are the same for every schedule and left out. Each schedule is simulated
(:func:`rannc_py.schedule.simulate`) on the same ranks; with two chunks per
rank a stage is half a rank's layers. Writes ``benchmarks/results/schedules.md``.

Usage: python benchmarks/schedule_bench.py
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch

from rannc_py.errors import ConfigError
from rannc_py.hardware.cluster import parse_cluster
from rannc_py.schedule import StageCosts, by_name, simulate

LAYERS, HIDDEN, SEQ, RANKS = 40, 5120, 2048, 8
ROWS = (("GPT-13B", 32), ("Fugaku-LLM shape", 7))
SCHEDULES = (("gpipe", None), ("1f1b", None), ("interleaved", 2), ("zb-h1", None), ("zb-v", None))


def stage_costs(layers_per_stage: float, split: bool) -> StageCosts:
    """Seconds per microbatch (one sample) of a stage of that many layers on one A64FX."""
    cl = parse_cluster(f"a64fx:nodes={RANKS}")
    fwd = layers_per_stage * 2 * (12 * HIDDEN**2 + 2 * SEQ * HIDDEN) * SEQ / cl.device.flops(torch.float32)
    link = cl.link(RANKS)
    send = link.latency + SEQ * HIDDEN * 4 / link.bandwidth
    return StageCosts(forward=fwd, backward=2 * fwd, send_act=send, send_grad=send,
                      backward_weight=fwd if split else 0.0)


def row(m: int) -> list[tuple[str, float | None, float | None]]:
    """(schedule, step seconds, samples/s) per schedule at p = RANKS and m microbatches (None: not applicable)."""
    out: list[tuple[str, float | None, float | None]] = []
    for name, chunks in SCHEDULES:
        try:
            sched = by_name(name, RANKS, m, chunks)
        except ConfigError:
            out.append((name, None, None))
            continue
        c = stage_costs(LAYERS / sched.num_stages, name.startswith("zb"))
        t = simulate(sched, [c] * sched.num_stages).step_time
        out.append((f"{name} (v={sched.chunks})" if sched.chunks > 1 else name, t, m / t))
    return out


def main() -> None:
    lines = ["# Predicted throughput per schedule (A64FX, 8 pipeline ranks, equal stages)", "",
             "Made by `benchmarks/schedule_bench.py` (see its docstring for the cost figures).", "",
             "| row | m | schedule | step (s) | samples/s per pipeline | vs 1f1b |", "|---|---|---|---|---|---|"]
    for label, m in ROWS:
        res = row(m)
        ref = next(sps for name, _, sps in res if name == "1f1b")
        assert ref is not None
        for name, t, sps in res:
            if t is None or sps is None:
                lines.append(f"| {label} | {m} | {name} | n/a (m not a multiple of p) | | |")
                continue
            lines.append(f"| {label} | {m} | {name} | {t:.3f} | {sps:.3f} | {sps / ref:.3f}x |")
            print(f"{label:17} m={m:2}  {name:16} step {t:7.3f} s  {sps:7.3f} samples/s  {sps / ref:.3f}x 1f1b")
    out = REPO / "benchmarks/results/schedules.md"
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
