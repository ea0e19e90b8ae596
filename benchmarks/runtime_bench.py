"""Training throughput of rannc_py against torch.distributed.pipelining, DeepSpeed and eager PyTorch.

Run from the repository root (it launches ``mpiexec`` itself, and installs
DeepSpeed 0.19.8 into the environment first if it is missing):

    python benchmarks/runtime_bench.py [--steps 3] [--warmup 2] [--rounds 2] [--vocab 50257]
        [--out benchmarks/results/runtime.md] [--gpipe] [--schedules]

Model: the project's GPT (``rannc_py.models.gpt``), 6 layers x 512 hidden,
seq 128, vocab 50257 (GPT-2's; ``--vocab``), no dropout, head untied (see
``benchmarks/peers/common.py``), AdamW; global batch 8; 1 torch thread per
rank. Each configuration runs in its
own process(es), ``--rounds`` times in interleaved rounds (the machine's load
changes over time); a launch reports the median of ``--steps`` timed steps
after ``--warmup`` steps (for rannc_py the first, tracing call is one of the
warm-up steps; a multi-rank step is the slowest rank's median) and a
configuration's step is the median over its launches.

Configurations:
  * eager, 1 process, 2 threads and 1 thread;
  * rannc_py on 1 rank (its default plan) — the 1-rank overhead vs eager, 1 thread;
  * equal layout, 2 ranks: 2 stages x 1 replica, 4 microbatches, 1F1B (also
    GPipe with ``--gpipe``): rannc_py with the planner placing the boundary,
    ``torch.distributed.pipelining`` (gloo) and DeepSpeed ``PipelineModule``
    (CPU accelerator, gloo) on the middle split (embed + blocks 0-2 | blocks
    3-5 + head); when the planner's boundary differs from the middle, rannc_py
    on the middle split too, which separates the balance gain from the
    runtime's own;
  * with ``--schedules``, schedules beyond 1F1B at the same 2 ranks and
    microbatches: torch.distributed.pipelining's ``ScheduleInterleaved1F1B``,
    ``ScheduleInterleavedZeroBubble`` and ``ScheduleZBVZeroBubble`` (two stages
    of whole layers per rank), and rannc_py's 2-rank pipeline with ZB-H1,
    interleaved 1F1B and ZB-V (4 stages, 2 per rank, cut by the planner) and
    with the planner choosing among every schedule it runs; the ratios
    compare rannc_py's fastest schedule with torch's ``Schedule1F1B`` and with
    the fastest of torch's three;
  * rannc_py on 2 ranks with the planner free (its default plan);
  * per-stage forward+backward time of one microbatch for each split (the
    stage-time imbalance), measured in one process.

Prints tables and writes ``benchmarks/results/runtime.md`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PEERS = REPO / "benchmarks" / "peers"
MPIEXEC = str(Path(sys.executable).parent / "mpiexec")
# The DeepSpeed peer; pinned, and installed next to the pinned torch only when missing.
DEEPSPEED = "deepspeed==0.19.8"


def ensure_deepspeed() -> None:
    """Install DeepSpeed into the running environment if it is missing (it needs a C++ compiler)."""
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        print(f"-- installing {DEEPSPEED} for the DeepSpeed peer", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", DEEPSPEED], check=True)


def launch(script: str, ranks: int, flags: list[str], threads: int = 1, env: dict[str, str] | None = None,
           timeout: float = 600) -> dict[str, Any]:
    """Run a worker (under mpiexec when ``ranks`` > 1 or ``script`` needs it) and parse its RESULT line.

    Returns the parsed dict, or ``{"error": <last lines of output>}`` when it failed.
    """
    cmd = [sys.executable, str(PEERS / script), *flags]
    if ranks > 1 or "--mpi" in flags:
        cmd = [MPIEXEC, "-n", str(ranks), *[c for c in cmd if c != "--mpi"]]
    # The worker imports the installed rannc_py: PYTHONPATH is left as it is, the checkout is not added.
    full_env = dict(os.environ, OMP_NUM_THREADS=str(threads), **(env or {}))
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, env=full_env, cwd=REPO, timeout=timeout,
                             check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s: {' '.join(cmd)}"}
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    tail = "\n".join((out.stdout + out.stderr).strip().splitlines()[-15:])
    return {"error": f"exit {out.returncode}: {tail}"}


def ms(t: float | None) -> str:
    """Seconds as whole milliseconds, '-' for None."""
    return "-" if t is None else f"{t * 1e3:.0f}"


class Bench:
    """Runs the configurations in ``--rounds`` interleaved rounds and merges each one's rounds.

    A configuration's step time is the median over rounds of each round's
    step (so a load spike during one launch weighs less); its timed steps are
    pooled for the per-step table.
    """

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rows: dict[str, tuple[int, str, dict[str, Any]]] = {}
        self.common = ["--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
                       "--layers", str(args.layers), "--hidden", str(args.hidden), "--vocab", str(args.vocab)]

    def run(self, label: str, ranks: int, layout: str, script: str, flags: list[str], **kw: Any) -> None:
        """Launch one configuration once, print its line, merge it into its row."""
        r = launch(script, ranks, [*flags, *self.common], **kw)
        if "error" in r:
            print(f"{label:52s} FAILED: {r['error']}", flush=True)
        else:
            pred = f"predicted {ms(r.get('predicted'))} ms" if r.get("predicted") else ""
            print(f"{label:52s} {ms(r['step']):>6} ms/step {pred}  {r.get('layout', layout)}", flush=True)
        if label not in self.rows or "error" in self.rows[label][2]:
            r["rounds"] = [r["step"]] if "step" in r else []
            r["trace_rounds"] = [r["trace_step"]] if "trace_step" in r else []
            self.rows[label] = (ranks, r.get("layout", layout), r)
        elif "step" in r:
            kept = self.rows[label][2]
            kept["rounds"].append(r["step"])
            kept["times"] += r["times"]
            kept["cpu"] = [max(a, b) for a, b in zip(kept["cpu"], r["cpu"])] if "cpu" in kept else r.get("cpu")
            kept["step"] = statistics.median(kept["rounds"])
            if "trace_step" in r:
                kept["trace_rounds"].append(r["trace_step"])
                kept["trace_step"] = statistics.median(kept["trace_rounds"])
        kept = self.rows[label][2]
        if "step" in kept:
            kept["samples"] = self.args.batch / kept["step"]

    def get(self, label: str) -> dict[str, Any]:
        """The merged result of a configuration ({} when it never ran)."""
        return self.rows[label][2] if label in self.rows else {}


def main() -> None:
    """Parse flags, run every configuration, print and write the results."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3, help="timed steps per configuration and round; default 3")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first; default 2 (at least 1)")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds over all configurations; default 2")
    ap.add_argument("--batch", type=int, default=8, help="global batch (rows of 128 tokens); default 8")
    ap.add_argument("--microbatches", type=int, default=4, help="microbatches at equal layout; default 4")
    ap.add_argument("--layers", type=int, default=6, help="GPT blocks; default 6")
    ap.add_argument("--hidden", type=int, default=512, help="GPT width; default 512")
    ap.add_argument("--vocab", type=int, default=50257,
                    help="vocabulary (LM head width); default 50257, GPT-2's; 256 = bytes, a head of negligible cost")
    ap.add_argument("--out", default="benchmarks/results/runtime.md",
                    help="results file, relative to the repository; default benchmarks/results/runtime.md")
    ap.add_argument("--gpipe", action="store_true", help="also compare at equal layout with GPipe")
    ap.add_argument("--schedules", action="store_true",
                    help="also compare schedules beyond 1F1B (interleaved, zero-bubble) with torch's")
    args = ap.parse_args()
    ensure_deepspeed()
    if args.warmup < 1:
        ap.error("--warmup must be at least 1 (rannc_py's first call traces and plans)")
    load0 = os.getloadavg()
    b = Bench(args)
    m = str(args.microbatches)
    half = args.layers // 2
    mid = f"embed + blocks 0-{half - 1} | blocks {half}-{args.layers - 1} + head"
    # per-stage times first: they also tell whether the planner's boundary differs from the middle
    stage = launch("rannc_worker.py", 1, ["stagetime", "--microbatches", m, *b.common])
    configs: list[tuple[str, int, str, str, list[str], dict[str, Any]]] = [
        ("eager, 1 process, 2 threads", 1, "-", "rannc_worker.py", ["eager", "--threads", "2"], {"threads": 2}),
        ("eager, 1 process, 1 thread", 1, "-", "rannc_worker.py", ["eager"], {}),
        ("rannc_py, 1 rank (default plan)", 1, "", "rannc_worker.py", ["rannc", "--mpi"], {}),
    ]
    equal: dict[str, dict[str, str]] = {}
    for sched in ["1f1b"] + (["gpipe"] if args.gpipe else []):
        S = "GPipe" if sched == "gpipe" else "1F1B"
        e = {"ours": f"rannc_py, 2 ranks, 2 stages, m={m}, {S}, planner split",
             "pipelining": f"torch.distributed.pipelining, 2 ranks, m={m}, {S}"}
        configs += [
            (e["ours"], 2, "", "rannc_worker.py",
             ["rannc", "--plan", "pinned", "--microbatches", m, "--schedule", sched], {}),
            (e["pipelining"], 2, mid, "pipelining_peer.py",
             ["--microbatches", m, "--schedule", sched, "--boundary", str(half)], {}),
        ]
        if sched == "1f1b":
            e["deepspeed"] = f"DeepSpeed PipelineModule, 2 ranks, m={m}, 1F1B"
            configs.append((e["deepspeed"], 2, mid, "deepspeed_peer.py", ["--microbatches", m],
                            {"env": {"DS_ACCELERATOR": "cpu"}}))
        if "planner" in stage:  # separate the balance gain from the runtime's own
            e["ours_middle"] = f"rannc_py, 2 ranks, 2 stages, m={m}, {S}, middle split"
            configs.append((e["ours_middle"], 2, "", "rannc_worker.py",
                            ["rannc", "--plan", "middle", "--microbatches", m, "--schedule", sched], {}))
        equal[sched] = e
    zb = schedule_configs(args, m) if args.schedules else {}
    configs += [(label, 2, layout, script, flags, {}) for label, (layout, script, flags) in zb.items()]
    free = "rannc_py, 2 ranks, planner free (default plan)"
    configs.append((free, 2, "", "rannc_worker.py", ["rannc"], {}))
    for rnd in range(args.rounds):
        print(f"-- round {rnd + 1} of {args.rounds}", flush=True)
        for label, ranks, layout, script, flags, kw in configs:
            b.run(label, ranks, layout, script, flags, **kw)
    load1 = os.getloadavg()
    lines = report(args, b, equal, stage, free, (load0, load1))
    if zb:
        lines += schedule_report(b, equal["1f1b"], zb)
    print("\n".join(lines))
    out = REPO / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    failed = [label for label, (_, _, r) in b.rows.items() if "step" not in r]
    if failed or "error" in stage:
        raise SystemExit(f"could not run: {', '.join(failed + (['per-stage timing'] if 'error' in stage else []))}; "
                         "their messages are above and in the results file")


# rannc_py's schedules on 2 ranks beyond 1F1B (--plan pinned: 2 pipeline positions, the planner places the
# boundaries; a chunked schedule's 4 stages), and
# torch's with two stages per rank. The labels' prefixes tell the report which side a row is on.
RANNC_SCHEDULES = {"ZB-H1": "zb-h1", "interleaved 1F1B, 2 chunks per rank": "interleaved", "ZB-V": "zb-v",
                   "planner's choice of schedule": "1f1b,gpipe,zb-h1,interleaved,zb-v"}
TORCH_SCHEDULES = {"ScheduleInterleaved1F1B": "interleaved-1f1b",
                   "ScheduleInterleavedZeroBubble": "interleaved-zb", "ScheduleZBVZeroBubble": "zbv"}


def schedule_configs(args: argparse.Namespace, m: str) -> dict[str, tuple[str, str, list[str]]]:
    """label -> (layout, worker script, flags) of the ``--schedules`` configurations."""
    out = {f"rannc_py, 2 ranks, 2 positions, m={m}, {name}": ("", "rannc_worker.py",
           ["rannc", "--plan", "pinned", "--microbatches", m, "--schedule", sched])
           for name, sched in RANNC_SCHEDULES.items()}
    out.update({f"torch.distributed.pipelining, 2 ranks, m={m}, {name}": (
        "4 stages of whole layers, 2 per rank", "pipelining_peer.py", ["--microbatches", m, "--schedule", sched])
        for name, sched in TORCH_SCHEDULES.items()})
    return out


def schedule_report(b: Bench, one_f_one_b: dict[str, str], zb: dict[str, Any]) -> list[str]:
    """The ``--schedules`` ratios: rannc_py's fastest schedule against torch's 1F1B and its fastest other."""
    ours = [b.get(label) for label in [one_f_one_b["ours"], *zb] if label.startswith("rannc_py")]
    theirs = [b.get(label) for label in zb if label.startswith("torch")]
    best = min((r for r in ours if "step" in r), key=lambda r: r["step"], default={})
    best_torch = min((r for r in theirs if "step" in r), key=lambda r: r["step"], default={})
    return ["", "## Schedules beyond 1F1B", "", "| comparison | rannc_py speed-up | target |", "|---|---|---|",
            (f"| rannc_py's fastest schedule vs torch Schedule1F1B | "
             f"{fx(ratio(best, b.get(one_f_one_b['pipelining'])))} | >= 1.1x |"),
            (f"| rannc_py's fastest schedule vs torch's fastest interleaved / zero-bubble | "
             f"{fx(ratio(best, best_torch))} | >= 1.0x |")]


def ratio(a: dict[str, Any], b: dict[str, Any]) -> float | None:
    """Speed of ``a`` over ``b`` (b's step time / a's), None when either failed."""
    return b["step"] / a["step"] if "step" in a and "step" in b else None


def fx(v: float | None, pct: bool = False) -> str:
    """A ratio as '1.23x' (or a signed percentage), 'could not run' for None."""
    if v is None:
        return "could not run"
    return f"{(v - 1) * 100:+.1f} %" if pct else f"{v:.2f}x"


def throughput_rows(b: Bench) -> list[str]:
    """The markdown table of every configuration's step, throughput, prediction, first loss, CPU and layout."""
    L = [("| configuration | ranks | step (ms) | samples/s | predicted step (ms) | predicted / measured | "
          "step in the trace (ms) | predicted / trace | loss of step 1 | CPU busy per rank | layout |"),
         "|---|---|---|---|---|---|---|---|---|---|---|"]
    for label, (ranks, layout, r) in b.rows.items():
        if "step" not in r:
            err = r.get("error", "").replace("\n", " ").replace("|", "/")[-400:]
            L.append(f"| {label} | {ranks} | could not run | | | | | | | | {err} |")
            continue
        pred = r.get("predicted")
        acc = f"{pred / r['step']:.2f}" if pred else "-"
        traced = r.get("trace_step")
        acc_trace = f"{pred / traced:.2f}" if pred and traced else "-"
        loss = (r.get("losses") or [None])[0]
        cpu = ", ".join(f"{c:.2f}" for c in r.get("cpu") or [])
        L.append(f"| {label} | {ranks} | {ms(r['step'])} | {r['samples']:.2f} | {ms(pred)} | {acc} | {ms(traced)} | "
                 f"{acc_trace} | "
                 f"{'-' if loss is None else f'{loss:.5f}'} | {cpu} | {layout or '-'} |")
    return L


def report(args: argparse.Namespace, b: Bench, equal: dict[str, dict[str, str]], stage: dict[str, Any],
           free: str, loads: tuple[tuple[float, ...], tuple[float, ...]]) -> list[str]:
    """The markdown of ``benchmarks/results/runtime.md``."""
    flags = [f"--{k} {v}" for k, v, d in (("steps", args.steps, 3), ("warmup", args.warmup, 2),
                                          ("rounds", args.rounds, 2), ("batch", args.batch, 8),
                                          ("microbatches", args.microbatches, 4), ("layers", args.layers, 6),
                                          ("hidden", args.hidden, 512), ("vocab", args.vocab, 50257)) if v != d]
    out = [] if args.out == "benchmarks/results/runtime.md" else [f"--out {args.out}"]
    cmd = " ".join(["python benchmarks/runtime_bench.py", *flags, *out, *(["--gpipe"] if args.gpipe else []),
                    *(["--schedules"] if args.schedules else [])])
    L = [
        "# Runtime benchmark", "",
        (f"GPT {args.layers} layers x {args.hidden} hidden, seq 128, vocab {args.vocab}, head untied, no dropout, AdamW; "
        f"global batch {args.batch}; 1 torch thread per rank unless stated. Each configuration ran "
        f"{args.rounds} times (interleaved rounds over all configurations), each time {args.warmup} warm-up "
        f"steps then {args.steps} timed steps; a launch's step = the slowest rank's median, a configuration's "
        f"step = the median over its launches. Command: `{cmd}`."), "",
        ("**Caveat: this machine has 2 cores shared with other work.** Load average (1/5/15 min) was "
        f"{'/'.join(f'{x:.1f}' for x in loads[0])} at the start and {'/'.join(f'{x:.1f}' for x in loads[1])} "
        "at the end; each launch saw a different load, so ratios carry that noise (see the per-step times "
        "in the last table), and 2 threads on a loaded 2-core machine are slower than 1."), "",
        "## Throughput", "",
    ]
    L += throughput_rows(b)
    L += ["", ("Every configuration trains the same weights on the same batches: the loss of step 1 (before "
          "any update) must agree. Predicted = the plan's step time (the runtime's planner: the model's "
          "profile measured on this machine); the hand-split peers have no prediction. Step in the trace = "
          "the median timed step of the measured timeline rannc_py records (``trace=``: each step from the first "
          "rank's start to the last rank's end). CPU busy = a rank's CPU "
          "time over the timed steps / their wall time (the highest of its launches; above 1 = more than one "
          "thread busy; below 1 = the process waited or was descheduled by other load).")]
    L += ["", "## Ratios", "", "| comparison | rannc_py speed-up | target |", "|---|---|---|"]
    for sched, e in equal.items():
        ours, mid_run = b.get(e["ours"]), b.get(e.get("ours_middle", e["ours"]))
        for peer, name in (("pipelining", "torch.distributed.pipelining"), ("deepspeed", "DeepSpeed")):
            if peer in e:
                other = b.get(e[peer])
                L.append(f"| equal layout ({sched}) vs {name}: total | {fx(ratio(ours, other))} | >= 1.1x |")
                L.append(f"| ... balance (rannc_py middle split / planner split) | {fx(ratio(ours, mid_run))} | |")
                L.append(f"| ... runtime (peer / rannc_py, both middle split) | {fx(ratio(mid_run, other))} | |")
    for peer, name in (("pipelining", "torch.distributed.pipelining"), ("deepspeed", "DeepSpeed")):
        if peer in equal["1f1b"]:
            L.append(f"| planner free vs {name} hand config (middle split, m={args.microbatches}, 1F1B) | "
                     f"{fx(ratio(b.get(free), b.get(equal['1f1b'][peer])))} | >= 1.3x |")
    ov = ratio(b.get("eager, 1 process, 1 thread"), b.get("rannc_py, 1 rank (default plan)"))
    L.append(f"| 1-rank overhead (rannc_py step / eager 1 thread step - 1) | {fx(ov, pct=True)} | <= +5 % |")
    L += ["", "## Stage balance at equal layout", ""]
    if "middle" not in stage:
        L.append(f"Per-stage timing could not run: {stage.get('error', '?')}")
    else:
        L += [("Forward + backward of one microbatch "
              f"({args.batch // args.microbatches} rows) per stage, measured stage after stage in one process "
              "(1 thread, median of --steps repetitions). Imbalance = slowest stage / mean; the planner's split "
              "is the one it chooses for 2 stages x 1 replica at these microbatches."), "",
              "| split | stage 1 starts at | stage 0 (ms) | stage 1 (ms) | imbalance |", "|---|---|---|---|---|"]
        for name, st in stage.items():
            t = st["times"]
            label = "middle (the peers'; the planner chose the same)" if name == "middle" and "planner" not in stage \
                else name
            L.append(f"| {label} | {st['boundary']} | {ms(t[0])} | {ms(t[1])} | {max(t) / (sum(t) / len(t)):.3f} |")
    L += ["", "## Per-step times (s), all launches", "", "| configuration | timed steps |", "|---|---|"]
    for label, (_, _, r) in b.rows.items():
        if "times" in r:
            L.append(f"| {label} | {', '.join(f'{t:.2f}' for t in r['times'])} |")
    return L


if __name__ == "__main__":
    main()
