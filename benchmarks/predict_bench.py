"""Predicted against measured step time, and whether the planner's microbatch choice is the fastest.

Run from the repository root (it launches ``mpiexec`` itself):

    python benchmarks/predict_bench.py [--steps 12] [--rounds 2] [--models tiny,bench] [--cached]
        [--out benchmarks/results/prediction.md]

Each row is one run of ``examples/gpt/train.py`` (the example training
script, one torch thread per rank) whose summary gives the plan's predicted
step time (``local:ranks=N``: the model profiled on this machine, the
runtime's fixed costs and the link measured here) and the measured median
step (forward, backward, gradient clip, optimizer step, after the first
step, which traces and plans). Models:

  * ``tiny``: the example's GPT (2 layers x 64, seq 64, vocab 256), global
    batch 16, on 1, 2 and 4 ranks with the planner free, and on 2 ranks at 2
    pipeline stages with 1, 4 and 16 microbatches and with the planner's own
    microbatch count;
  * ``bench``: the runtime benchmark's GPT (6 layers x 512, seq 128, vocab
    50257), global batch 8, on 2 ranks: the planner free, and 2 stages with
    1, 4 and the planner's microbatches (16 microbatches of a batch of 8
    cannot be split; 8 is the most).

Every configuration runs ``--rounds`` times in interleaved rounds (the
machine's load changes); a configuration's figures are the medians. The
ratio column is predicted / measured (1.0 = exact; below 1 = optimistic).
Prints a table and writes ``--out`` (Markdown) and a JSON beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
MPIEXEC = str(Path(sys.executable).parent / "mpiexec")
TRAIN = REPO / "examples" / "gpt" / "train.py"
MODELS = {
    "tiny": ["--size", "tiny", "--batch-size", "16"],
    "bench": ["--layers", "6", "--hidden", "512", "--heads", "8", "--seq-len", "128", "--vocab", "50257",
              "--batch-size", "8"],
}
TARGET = 0.15  # |predicted / measured - 1| within this counts as held


def configurations(models: list[str]) -> list[tuple[str, str, int, list[str]]]:
    """(model, label, ranks, extra flags) of every row."""
    rows: list[tuple[str, str, int, list[str]]] = []
    if "tiny" in models:
        rows += [("tiny", f"{n} rank{'s' * (n > 1)}, planner free", n, []) for n in (1, 2, 4)]
        rows += [("tiny", f"2 stages, m={m}", 2, ["--stages", "2", "--microbatches", str(m)]) for m in (1, 4, 16)]
        rows.append(("tiny", "2 stages, planner's m", 2, ["--stages", "2"]))
    if "bench" in models:
        rows.append(("bench", "2 ranks, planner free", 2, []))
        rows += [("bench", f"2 stages, m={m}", 2, ["--stages", "2", "--microbatches", str(m)]) for m in (1, 4)]
        rows.append(("bench", "2 stages, planner's m", 2, ["--stages", "2"]))
    return rows


def run_once(model: str, ranks: int, flags: list[str], steps: int, cached: bool) -> dict[str, Any]:
    """One training run; its summary (plan, predicted and measured step). Unless ``cached``, the
    run gets an empty cache folder, so its profile and calibration are measured in the run's own
    conditions (a machine whose speed drifts makes an hour-old profile wrong by as much)."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [MPIEXEC, "-n", str(ranks), sys.executable, str(TRAIN), *MODELS[model], *flags,
               "--steps", str(steps), "--warmup", "1", "--docs", "400", "--out", out]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        if not cached:
            env["RANNC_CACHE_DIR"] = str(Path(out) / "cache")
        done = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=1800)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        return json.loads((Path(out) / "summary.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--models", default="tiny,bench")
    ap.add_argument("--cached", action="store_true",
                    help="plan from this machine's cached profiles and calibration instead of measuring afresh")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "prediction.md"))
    args = ap.parse_args()
    rows = configurations(args.models.split(","))
    load_before = os.getloadavg()
    runs: dict[int, list[dict[str, Any]]] = {k: [] for k in range(len(rows))}
    for rnd in range(args.rounds):
        for k, (model, label, ranks, flags) in enumerate(rows):
            s = run_once(model, ranks, flags, args.steps, args.cached)
            runs[k].append(s)
            print(f"round {rnd + 1}: {model}, {label}: measured {s['measured_step_time'] * 1e3:.1f} ms, predicted "
                  f"{s['predicted_step_time'] * 1e3:.1f} ms (m={s['microbatches']}, stages {s['stages']})", flush=True)
    load_after = os.getloadavg()
    results = []
    for k, (model, label, ranks, flags) in enumerate(rows):
        measured = statistics.median(s["measured_step_time"] for s in runs[k])
        predicted = statistics.median(s["predicted_step_time"] for s in runs[k])
        results.append({"model": model, "configuration": label, "ranks": ranks, "flags": flags,
                        "microbatches": runs[k][0]["microbatches"], "stages": runs[k][0]["stages"],
                        "measured": measured, "predicted": predicted, "ratio": predicted / measured,
                        "measured_runs": [s["measured_step_time"] for s in runs[k]]})
    text = report(results, args, load_before, load_after)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))


def choice_rows(results: list[dict[str, Any]]) -> list[str]:
    """Per model: the planner's microbatch count at 2 stages against the measured-fastest pinned one."""
    lines = []
    for model in dict.fromkeys(r["model"] for r in results):
        pinned = [r for r in results if r["model"] == model and "stages, m=" in r["configuration"]]
        chosen = [r for r in results if r["model"] == model and r["configuration"] == "2 stages, planner's m"]
        if not pinned or not chosen:
            continue
        best = min(pinned, key=lambda r: r["measured"])
        c = chosen[0]
        slower = c["measured"] / best["measured"] - 1
        lines.append(f"| {model} | {c['microbatches']} | {c['measured'] * 1e3:.1f} | {best['microbatches']} | "
                     f"{best['measured'] * 1e3:.1f} | {100 * slower:+.1f} % | {'yes' if slower <= 0.05 else 'no'} |")
    return lines


def report(results: list[dict[str, Any]], args: argparse.Namespace, before: tuple[float, ...],
           after: tuple[float, ...]) -> str:
    rows = [f"| {r['model']} | {r['configuration']} | {r['ranks']} | {r['microbatches']} | {r['stages']} | "
            f"{r['measured'] * 1e3:.1f} | {r['predicted'] * 1e3:.1f} | {r['ratio']:.2f} | "
            f"{'yes' if abs(r['ratio'] - 1) <= TARGET else 'no'} | "
            f"{', '.join(f'{t * 1e3:.1f}' for t in r['measured_runs'])} |" for r in results]
    held = sum(abs(r["ratio"] - 1) <= TARGET for r in results)
    return "\n".join([
        "# Predicted against measured step time", "",
        (f"Command: `python benchmarks/predict_bench.py --steps {args.steps} --rounds {args.rounds} "
        f"--models {args.models}{' --cached' * args.cached}`. Every run {'plans from the cached' if args.cached else 'measures its own'} "
        f"profile and calibration. One torch thread per rank; this machine has {os.cpu_count()} cores "
        f"(4 ranks share them). Load average (1/5/15 min) {'/'.join(f'{x:.1f}' for x in before)} at the start, "
        f"{'/'.join(f'{x:.1f}' for x in after)} at the end."), "",
        ("| model | configuration | ranks | microbatches | replicas per stage | measured step (ms) | "
        "predicted (ms) | predicted / measured | within 15 % | measured per round (ms) |"),
        "|---|---|---|---|---|---|---|---|---|---|", *rows, "",
        f"{held} of {len(results)} rows within {TARGET:.0%}.", "",
        "## The planner's microbatch count at 2 stages", "",
        "| model | planner's m | its step (ms) | fastest pinned m | its step (ms) | planner's slower by | within 5 % |",
        "|---|---|---|---|---|---|---|", *choice_rows(results), ""])


if __name__ == "__main__":
    main()
