"""What a new call signature costs: a retrace for a new sequence length, the first eval call
after training, against one training step (one process, the project's GPT and Hugging Face GPT-2).

Writes benchmarks/results/retrace.md. Run: ``python benchmarks/retrace_bench.py``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests/mpi_scripts"))

from runtime_models import build_model, call_kwargs, make_batch

import rannc_py

LAYOUT = {"stages": 1, "microbatches": 2}


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def measure(name: str) -> dict[str, float]:
    """Seconds of: a training step, a step at a new length, the first eval call, a cached eval call."""
    torch.manual_seed(0)
    model = build_model(name, dropout=0.1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    wrapped = rannc_py.RaNNCModule(model, opt, plan=LAYOUT)
    kw = call_kwargs(name)

    def step(seq: int, seed: int) -> None:
        batch = {k: v[:, :seq] for k, v in make_batch(name, 8, seed).items()}
        wrapped(**batch, **kw).loss.backward()
        opt.step()
        opt.zero_grad()

    step(16, 0)  # setup: trace and build, not measured
    train = min(_timed(lambda s=s: step(16, s)) for s in range(1, 4))
    new_len = _timed(lambda: step(10, 5))  # a length the dynamic trace covers: no retrace expected
    before = sum(len(p) for p in wrapped._programs.values())
    # Length 2: below the range a dynamic trace admits (export specialises 0 and 1, the GPT's guard
    # says >= 3), so this retraces a training program at that length.
    outside = _timed(lambda: step(2, 6))
    if sum(len(p) for p in wrapped._programs.values()) == before:
        outside = float("nan")  # the trace covered it: nothing retraced
    wrapped.eval()
    ids = make_batch(name, 8, 9)["input_ids"]
    with torch.no_grad():
        first_eval = _timed(lambda: wrapped(input_ids=ids, **kw))
        cached_eval = min(_timed(lambda: wrapped(input_ids=ids, **kw)) for _ in range(3))
        retraced = sum(len(p) for p in wrapped._programs.values())
    return {"train step": train, "new length": new_len, "outside": outside, "first eval": first_eval, "cached eval": cached_eval,
            "programs": retraced}


def _outside(r: dict[str, float]) -> str:
    """The retrace cost at a length outside the range, or why there is none."""
    if r["outside"] != r["outside"]:  # nan: the dynamic trace admitted that length too
        return "none (the trace covers it)"
    return f"{r['outside'] * 1e3:.0f} ({r['outside'] / r['train step']:.0f}x)"


def main() -> None:
    torch.set_num_threads(1)
    rows = []
    for name in ("gpt", "hf_gpt2"):
        r = measure(name)
        rows.append(f"| {name} | {r['train step'] * 1e3:.1f} | {r['new length'] * 1e3:.1f} | "
                    f"{_outside(r)} | "
                    f"{r['first eval'] * 1e3:.0f} ({r['first eval'] / r['train step']:.0f}x) | "
                    f"{r['cached eval'] * 1e3:.1f} | {int(r['programs'])} |")
    text = "\n".join([
        "# Retrace cost (one process, one thread, 8 rows x 16 tokens, dropout 0.1)", "",
        ("| model | train step ms | step at a new length ms | retrace: length outside the range ms (x step) "
         "| first eval call ms (x step) | cached eval ms | programs after |"),
        "|---|---|---|---|---|---|---|", *rows, "",
        ("A new length inside the traced range runs the cached program (no retrace). The first eval call "
        "traces the model in eval mode and builds its stage once."), ""])
    print(text)
    out = ROOT / "benchmarks/results/retrace.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text(text)


if __name__ == "__main__":
    main()
