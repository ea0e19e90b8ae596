"""Kernel and fused-optimizer throughput against this machine's memory bandwidth.

Measures a STREAM-like triad (a = b + s*c) as the bandwidth limit, then the
GB/s of every kernel in ``rannc_py.optim.kernels`` (bytes each must read and
write, divided by the best time of several runs), and the time per step of
FusedAdamW against torch.optim.AdamW (default, foreach and fused) on 10M and
100M parameters, for each thread count. Prints tables and writes
benchmarks/results/kernels.md.

    python benchmarks/kernels_bench.py                 # full run
    python benchmarks/kernels_bench.py --quick         # 1M-element kernels, 10M params only
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch

from rannc_py.optim import FusedAdamW, kernels

RESULTS = Path(__file__).resolve().parent / "results" / "kernels.md"


def best_time(fn: Callable[[], object], reps: int) -> float:
    """Best wall time of ``reps`` calls of fn after one warm-up call (seconds)."""
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def triad_gbs(n: int, reps: int) -> float:
    """Bandwidth of a = b + s*c on n floats (12 bytes per element), torch's vector code."""
    a, b, c = torch.empty(n), torch.rand(n), torch.rand(n)
    t = best_time(lambda: torch.add(b, c, alpha=3.0, out=a), reps)
    return 12 * n / t / 1e9


def kernel_table(n: int, reps: int) -> list[tuple[str, float, float]]:
    """(kernel, bytes per element, GB/s) for each kernel on n-element buffers."""
    x, y, z, w = (torch.rand(n) for _ in range(4))
    out = torch.empty(n)
    h = torch.empty(n, dtype=torch.bfloat16)
    parts = [x[: n // 2], x[n // 2 :]]
    p, g, m, v = (torch.rand(n) for _ in range(4))
    b = torch.rand(n)
    addr = [t.data_ptr() for t in (p, g, m, v, b)]
    core = kernels._k
    cases: list[tuple[str, int, Callable[[], object]]] = [
        ("sum_into", 12, lambda: kernels.sum_into_(out, y)),
        ("sum_buffers (k=4)", 20, lambda: kernels.sum_buffers([x, y, z, w], out=out)),
        ("scale", 8, lambda: kernels.scale_(out, 1.0)),
        ("sum_squares", 4, lambda: kernels.sum_squares(x)),
        ("pack (2 tensors)", 8, lambda: kernels.pack(parts, out=out)),
        ("unpack (2 tensors)", 8, lambda: kernels.unpack(out, parts)),
        ("f32 -> bf16", 6, lambda: kernels.to_bf16(x, out=h)),
        ("bf16 -> f32", 6, lambda: kernels.from_bf16(h, out=out)),
        ("adam_step", 28, lambda: core.adam_step([addr[0]], [addr[1]], [addr[2]], [addr[3]], [n],
                                                 lr=1e-9, beta1=0.9, beta2=0.999, eps=1e-8,
                                                 weight_decay=0.01, step=1.0,
                                                 decoupled_weight_decay=True, maximize=False)),
        ("sgd_step (momentum)", 20, lambda: core.sgd_step([addr[0]], [addr[1]], [addr[4]], [n],
                                                          lr=1e-9, momentum=0.9, dampening=0.0,
                                                          weight_decay=0.0, nesterov=False,
                                                          maximize=False, first_step=False)),
    ]  # fmt: skip
    return [
        (name, nbytes, nbytes * n / best_time(fn, reps) / 1e9)
        for name, nbytes, fn in cases
    ]


def model_params(total: int, pieces: int = 10) -> list[torch.nn.Parameter]:
    """``total`` parameters in ``pieces`` tensors, each with a gradient."""
    ps = []
    for i in range(pieces):
        n = total // pieces + (total % pieces if i == 0 else 0)
        p = torch.nn.Parameter(torch.randn(n))
        p.grad = torch.randn(n)
        ps.append(p)
    return ps


def adamw_ms(total: int, reps: int) -> dict[str, float]:
    """Milliseconds per AdamW step on ``total`` parameters for each implementation."""
    makers: dict[str, Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]] = {
        "torch default": lambda ps: torch.optim.AdamW(ps, lr=1e-3),
        "torch foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True),
        "torch fused": lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True),
        "rannc FusedAdamW": lambda ps: FusedAdamW(ps, lr=1e-3),
    }
    out = {}
    for name, make in makers.items():
        ps = model_params(total)
        opt = make(ps)
        out[name] = best_time(opt.step, reps) * 1e3
        del opt, ps
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="small sizes, for a fast check (default off)",
    )
    ap.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=[1, 2],
        help="thread counts (default 1 2)",
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=RESULTS,
        help=f"results file (default {RESULTS.name} in results/)",
    )
    args = ap.parse_args()
    n = 1_000_000 if args.quick else 20_000_000
    reps = 3 if args.quick else 7
    sizes = [10_000_000] if args.quick else [10_000_000, 100_000_000]

    command = "python benchmarks/kernels_bench.py" + (" --quick" if args.quick else "")
    cpu = platform.processor() or "unknown CPU"
    lines = [
        "# Kernel benchmarks",
        "",
        f"`{command}` on {platform.machine()} ({cpu}), kernel path `{kernels.get_isa()}`, torch {torch.__version__}.",
        f"Kernels on {n:,}-element fp32 buffers; GB/s = (bytes read + written) / best of {reps} runs.",
        "The limit is a STREAM-like triad (a = b + s*c, counted as 12 bytes/element like STREAM) measured",
        "in the same run; in-place kernels can exceed it since they need no write-allocate traffic.",
        "",
    ]
    for threads in args.threads:
        torch.set_num_threads(threads)
        kernels.set_num_threads(threads)
        limit = triad_gbs(n, reps)
        rows = kernel_table(n, reps)
        lines += [f"## {threads} thread(s): triad {limit:.1f} GB/s", "",
                  "| kernel | bytes/elem | GB/s | % of triad |", "|---|---:|---:|---:|"]  # fmt: skip
        lines += [
            f"| {name} | {nb} | {gbs:.1f} | {100 * gbs / limit:.0f} % |"
            for name, nb, gbs in rows
        ]
        impls = [
            "torch default",
            "torch foreach",
            "torch fused",
            "rannc FusedAdamW",
            "vs fused",
            "vs default",
        ]
        lines += [
            "",
            f"| AdamW step, params | {' | '.join(impls)} |",
            "|---|" + "---:|" * len(impls),
        ]
        for total in sizes:
            ms = adamw_ms(total, max(3, reps // 2))
            cells = [f"{v:.1f} ms" for v in ms.values()]
            cells += [
                f"{ms[ref] / ms['rannc FusedAdamW']:.2f}x"
                for ref in ("torch fused", "torch default")
            ]
            lines.append(f"| {total / 1e6:.0f}M | {' | '.join(cells)} |")
        lines.append("")
        print("\n".join(lines[-(len(rows) + len(sizes) + 8) :]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
