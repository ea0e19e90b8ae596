"""Planner benchmark: search time and predicted throughput against baseline splits, with tensor parallelism.

For GPT 1.3B, GPT 13B (Fugaku-LLM's shape: 40 layers x 5184 hidden, 36 heads,
seq 2048, global batch 2016), GPT 175B, BERT-large and a 4.9B-parameter BERT
(hidden 2048, 96 layers), traced on the meta device, on ``a64fx`` and
``a100-80g`` clusters of 8..4096 devices (and GPT 13B on 13,824 A64FX nodes,
Fugaku-LLM's job), it runs the planner's search -- tensor degrees (those the
traced graph allows, :func:`rannc_py.graph.tensor_annotate.tensor_annotation`,
that divide the device count) together with stages, replicas, microbatches,
schedule and recompute -- and three baselines at tensor degree 1 on the same
cost model and simulator:

- uniform: equal numbers of blocks (layers) per stage (DeepSpeed "uniform");
- params: stages balanced by parameter bytes (DeepSpeed's default);
- time: stages balanced by compute time (torchgpipe's balance_by_time);

each with every stage count dividing the device count (replicas = D / p per
stage, "the best replica count"), every microbatch count and schedule the
planner considers, recompute where needed, and the same final pick (simulate
the best by T).

Also:

- the Fugaku-LLM hand layout (TP 6 x PP 8 x DP 288, 5 layers per stage, m = 7,
  recompute on stages 0-3) priced by :func:`rannc_py.planner.api.predict_plan`
  (the same cost model and simulator), against the planner's plan;
- for the rows that do not fit at tensor degree 1 with every replica keeping
  its whole optimizer state: which fit with optimizer sharding
  (``shard_optimizer=None``), with tensor parallelism, and with both;
- for the GPT-13B rows: the search with each experimental schedule (``zb-h1``,
  ``interleaved``, ``zb-v``) allowed too, its predicted gain and the chunks chosen
  (``--only-schedules`` reruns just that section).

Writes ``benchmarks/results/plan.md``.

Usage: python benchmarks/plan_bench.py [--sizes 8,64,512,4096] [--models gpt-1.3b,...] [--only-schedules]
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

from rannc_py.cli import build_model
from rannc_py.errors import NoFeasiblePlanError
from rannc_py.graph.tensor_annotate import tensor_annotation
from rannc_py.graph.trace import trace
from rannc_py.hardware.cluster import parse_cluster
from rannc_py.planner.api import build_space, chain_from_graph, layout_to_plan, predict_plan, search_tensor
from rannc_py.planner.baselines import baseline_picks
from rannc_py.planner.cost import CostModel
from rannc_py.planner.options import PlanOptions
from rannc_py.planner.plan import Plan, StagePlan
from rannc_py.planner.tensor import tensor_chain
from rannc_py.profiling import profile
from rannc_py.profiling.analytic import graph_dtype

REPO = Path(__file__).resolve().parents[1]

MODELS = {
    "gpt-1.3b": ("gpt:1.3b", 2048, 512),
    "gpt-13b": ("gpt:13b", 2048, 2016),
    "gpt-175b": ("gpt:175b", 2048, 1536),
    "bert-large": ("rbert:large", 512, 1024),
    "bert-4.9b": ("rbert:4.9b", 512, 1024),
}
FUGAKU = ("gpt-13b", "a64fx", 13824)  # Fugaku-LLM's job, planned on top of the size grid
SCHEDULES = ("1f1b", "gpipe")


class Row:
    """One (model, cluster, size) row's results."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


def models_for(graph, ann, cl, batch, shard=False, schedules=SCHEDULES):
    """(cost model, space) of every tensor degree the graph allows that divides the device count."""
    prof = profile(graph, graph.batch_size, cl)
    chain = chain_from_graph(graph, prof)
    opts = PlanOptions(schedules=schedules)
    out = []
    for t in (1, *ann.allowed):
        if cl.num_devices % t:
            continue
        tc = None if t == 1 else tensor_chain(graph, chain, ann.at(t), cl.device)
        # Large-scale training uses only the loss: outputs are not returned to every rank.
        cost = CostModel(chain if tc is None else tc.chain, cl, batch, return_outputs=False,
                         shard_optimizer=None if shard else False, tensor=tc)
        out.append((cost, build_space(cost.chain, cl, batch, opts, devices=cost.devices)))
    return out


def search(models):
    """(plan-like summary dict or None, needed GiB or None, wall s, CPU s) of the search over ``models``."""
    t1, c1 = time.perf_counter(), time.process_time()
    try:
        cost, lay, step = search_tensor(models)
    except NoFeasiblePlanError as e:
        return None, e.required_memory / 2**30 if e.required_memory else None, \
            time.perf_counter() - t1, time.process_time() - c1
    return (cost, lay, step), None, time.perf_counter() - t1, time.process_time() - c1


def describe(cost, lay) -> str:
    pos = [lay.position_of(s) for s in range(lay.num_stages)]
    per_position = [lay.replicas[pos.index(r)] for r in range(lay.num_positions)]
    reps = "/".join(str(r) for r in per_position[:4]) + ("..." if lay.num_positions > 4 else "")
    levels = sorted(set(lay.shard)) if lay.shard else [0]
    shard = "" if levels == [0] else " " + "+".join(f"s{v}" for v in levels)
    chunks = f" v={lay.chunks}" if lay.chunks > 1 else ""
    return (f"tp{lay.tensor} x {lay.num_positions}st x{reps} m={lay.m} {lay.schedule}{chunks}"
            f"{' rc' if any(lay.recompute) else ''}{shard} ({lay.origin})")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="8,64,512,4096")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--clusters", default="a64fx,a100-80g")
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/plan.md"))
    ap.add_argument("--only-schedules", action="store_true",
                    help="run only the experimental schedules' GPT-13B section and rewrite that section of --out "
                         "(the rest of the file, made by a full run, is kept)")
    ns = ap.parse_args()
    if ns.only_schedules:
        ns.models = "gpt-13b"
    rows, infos, fugaku, zb = [], [], None, []
    for name in ns.models.split(","):
        spec, seq, batch = MODELS[name]
        model, args, kwargs = build_model(spec, seq)
        t0 = time.perf_counter()
        graph = trace(model, args, kwargs)
        t_trace = time.perf_counter() - t0
        t0 = time.perf_counter()
        ann = tensor_annotation(graph)
        t_split = time.perf_counter() - t0
        nparams = sum(p.numel() for p in model.parameters())
        info = (f"{name}: {nparams / 1e9:.2f} B params, {len(graph.ops)} ops, traced in {t_trace:.1f} s, tensor "
                f"splits at degrees {list(ann.allowed)} found in {t_split:.1f} s")
        infos.append(info)
        print(info, flush=True)
        grid = [(p, int(s)) for p in ns.clusters.split(",") for s in ns.sizes.split(",")]
        if name == FUGAKU[0] and FUGAKU[1] in ns.clusters.split(","):
            grid.append(FUGAKU[1:])
        for preset, size in grid:
            key = "nodes" if preset == "a64fx" else "gpus"
            cl = parse_cluster(f"{preset}:{key}={size}")
            t1, c1 = time.perf_counter(), time.process_time()
            models = models_for(graph, ann, cl, batch)
            t_build, c_build = time.perf_counter() - t1, time.process_time() - c1
            best, need, w, c = search(models)  # the planner's search over every degree
            wall, cpu = t_build + w, c_build + c
            if name == "gpt-13b":  # each experimental schedule's gain
                ours_sps = None if best is None else batch / best[2]
                zb.append(_schedules_row(graph, ann, cl, batch, preset, size, ours_sps, best))
                print(zb[-1], flush=True)
            if ns.only_schedules:
                continue
            plain = search(models[:1])[0]  # degree 1 alone (not timed): the planner before tensor parallelism
            if best is None:
                ours = mfu = None
                layout = f"infeasible (needs {need:.1f} GiB/device)" if need else "infeasible"
            else:
                cost, lay, step = best
                plan = layout_to_plan(cost, lay, step, graph.fingerprint(), graph_dtype(graph), wall)
                ours, mfu, layout = plan.samples_per_second, plan.mfu, describe(cost, lay)
            cost1, space1 = models[0]
            picks = baseline_picks(cost1, space1)
            base = {rule: None if pk is None else batch / pk[1] for rule, pk in picks.items()}
            plain_sps = None if plain is None else batch / plain[2]
            extra = None
            if plain is None:  # what makes the row fit
                shard1, _, _, _ = search(models_for(graph, ann, cl, batch, shard=True)[:1])
                both, need_b, _, _ = search(models_for(graph, ann, cl, batch, shard=True))
                extra = {"shard": _fit(shard1, batch), "tp": _fit(best, batch), "both": _fit(both, batch, need_b)}
            row = Row(name=name, preset=preset, size=size, wall=wall, cpu=cpu, ours=ours, mfu=mfu, base=base,
                      layout=layout, plain=plain_sps, extra=extra)
            rows.append(row)
            print(_fmt_row(row), flush=True)
            if (name, preset, size) == FUGAKU and best is not None:
                fugaku = _fugaku(graph, ann, cl, batch, plan, best)
                print(fugaku["text"], flush=True)
    if ns.only_schedules:
        text = Path(ns.out).read_text()
        head = text.split(SCHEDULES_HEADING)[0].split(OLD_SCHEDULES_HEADING)[0].rstrip("\n")
        Path(ns.out).write_text(head + "\n\n" + "\n".join(_schedule_lines(zb)) + "\n")
        return
    _write(ns.out, rows, infos, fugaku, zb)


EXPERIMENTAL = ("zb-h1", "interleaved", "zb-v")
SCHEDULES_HEADING = "## The experimental schedules on the GPT-13B rows"
OLD_SCHEDULES_HEADING = "## The zb-h1 schedule on the GPT-13B rows"


def _schedules_row(graph, ann, cl, batch, preset, size, ours, best) -> dict:
    """The search again with each experimental schedule allowed beside 1F1B and GPipe:
    {schedule: (samples/s or None, layout or None, wall s)}, and the default plan's."""
    out = {"preset": preset, "size": size, "ours": ours, "layout": None if best is None else describe(*best[:2])}
    for extra in EXPERIMENTAL:
        t1, c1 = time.perf_counter(), time.process_time()
        z, _, _, _ = search(models_for(graph, ann, cl, batch, schedules=(*SCHEDULES, extra)))
        out[extra] = (None if z is None else batch / z[2], None if z is None else describe(*z[:2]),
                      time.perf_counter() - t1, time.process_time() - c1)
    return out


def _schedule_lines(zb) -> list[str]:
    def gain(a, b):
        return "-" if a is None or b is None else f"{b / a:.3f}x"

    return [
        SCHEDULES_HEADING,
        "",
        "The search again with one experimental schedule allowed beside 1F1B and GPipe,",
        "`schedules=(\"1f1b\", \"gpipe\", S)` (tensor degrees searched too): ZB-H1 (split backward),",
        "interleaved 1F1B (v = 2, 3 or 4 model chunks per rank, `v=` in the layout; m a multiple of the",
        "pipeline positions) and ZB-V (two chunks per rank in a V, split backward). A chunked layout",
        "is the search's 1F1B layouts (positions, replicas, microbatches) re-cut into p x v stages",
        "(`rannc_py/planner/search.py`); `Sst` counts positions. Gains are over the default search",
        "(1F1B and GPipe); search s: CPU (wall) seconds of the search with that schedule allowed",
        "(profile, tensor chains and search, as in the table above), on the shared 2-core machine.",
        "",
        ("| cluster | devices | 1f1b/gpipe samples/s | layout | " + " | ".join(
            f"with {x} | gain | layout with {x} | search s" for x in EXPERIMENTAL) + " |"),
        "|---|---|---|---|" + "---|---|---|---|" * len(EXPERIMENTAL),
        *(f"| {r['preset']} | {r['size']} | {_f(r['ours'])} | {r['layout'] or '-'} | " + " | ".join(
            f"{_f(r[x][0])} | {gain(r['ours'], r[x][0])} | {r[x][1] or '-'} | {r[x][3]:.2f} ({r[x][2]:.2f})"
            for x in EXPERIMENTAL)
          + " |" for r in zb),
    ]


def _fit(result, batch, need=None) -> str:
    if result is None:
        return f"no (needs {need:.1f} GiB)" if need else "no"
    cost, lay, step = result
    return f"yes: {batch / step:.4g} samples/s, {describe(cost, lay)}"


def _layer(path: str) -> int | None:
    m = re.search(r"\.h\.(\d+)(\.|$)", path)
    return None if m is None else int(m.group(1))


def hand_plan(graph, *, stages: int, tensor: int, replicas: int, microbatches: int, recompute, batch: int) -> Plan:
    """The hand layout as a Plan: equal numbers of transformer layers per stage (the ops before the
    first layer in stage 0, those after the last in the last stage), consecutive tensor groups."""
    layers = 1 + max(x for op in graph.ops if (x := _layer(op.module_path)) is not None)
    per = layers // stages
    assignment, cur = [], 0
    for op in graph.ops:
        x = _layer(op.module_path)
        if x is not None:
            cur = min(x // per, stages - 1)
        assignment.append(cur)
    out, first = [], 0
    for s in range(stages):
        ops = tuple(i for i, a in enumerate(assignment) if a == s)
        fqns = sorted({f for i in ops for f in (*graph.ops[i].params, *graph.ops[i].buffers)})
        ranks = tuple(range(first, first + replicas * tensor))
        first += len(ranks)
        out.append(StagePlan(index=s, ops=ops, param_fqns=tuple(fqns), ranks=ranks, recompute=recompute[s],
                             predicted_compute_time=0.0, predicted_peak_memory=0, tensor=tensor))
    return Plan(batch_size=batch, microbatches=microbatches, schedule="1f1b", stages=tuple(out), world_size=first,
                graph_fingerprint=graph.fingerprint(), cluster="hand layout", step_time=0.0,
                peak_memory_per_rank=(0,) * first, samples_per_second=0.0, mfu=0.0, search_time=0.0)


def _fugaku(graph, ann, cl, batch, plan, best) -> dict:
    hand = hand_plan(graph, stages=8, tensor=6, replicas=288, microbatches=7, recompute=[True] * 4 + [False] * 4,
                     batch=batch)
    opts = PlanOptions(cluster=cl, return_outputs=False)
    got = predict_plan(graph, hand, opts, cluster=cl, tensor=ann)
    no_rc = predict_plan(graph, hand_plan(graph, stages=8, tensor=6, replicas=288, microbatches=7,
                                          recompute=[False] * 8, batch=batch), opts, cluster=cl, tensor=ann)
    ratio = plan.samples_per_second / got.samples_per_second
    gib = 2**30
    hand_line = (f"- hand layout TP 6 x PP 8 x DP 288, m = 7, recompute on stages 0-3: {got.samples_per_second:.4g} "
                 f"samples/s (step {got.step_time:.3f} s), peak memory {max(got.peak_memory_per_rank) / gib:.1f} "
                 f"GiB/rank, tensor-group collectives {got.stages[0].tensor_collectives * 1e3:.1f} ms per "
                 "microbatch on stage 0")
    no_rc_line = (f"- the same layout without recompute: {no_rc.samples_per_second:.4g} samples/s, peak memory "
                  f"{max(no_rc.peak_memory_per_rank) / gib:.1f} GiB/rank")
    plan_line = (f"- the planner's plan: {plan.samples_per_second:.4g} samples/s (step {plan.step_time:.3f} s), "
                 f"{describe(*best[:2])}, stages of {'/'.join(str(len(s.ops)) for s in plan.stages)} ops, peak "
                 f"memory {max(plan.peak_memory_per_rank) / gib:.1f} GiB/rank")
    lines = [hand_line, no_rc_line, plan_line, f"- ratio planner / hand: {ratio:.3f}x"]
    return {"ratio": ratio, "text": "\n".join(lines), "hand": got, "plan": plan}


def _f(x) -> str:
    return "-" if x is None else f"{x:.4g}"


def _beats_all(row) -> bool:
    return row.ours is None or all(b is None or row.ours >= b * (1 - 1e-9) for b in row.base.values())


def _fmt_row(row) -> str:
    gain = "-" if row.ours is None or row.plain is None else f"{row.ours / row.plain:.2f}x"
    return (f"| {row.name} | {row.preset} | {row.size} | {row.wall:.2f} | {row.cpu:.2f} | {_f(row.ours)} | "
            f"{'-' if row.mfu is None else f'{100 * row.mfu:.1f}%'} | {_f(row.plain)} | {gain} | "
            f"{_f(row.base['uniform'])} | {_f(row.base['params'])} | {_f(row.base['time'])} | "
            f"{'yes' if _beats_all(row) else 'NO'} | {row.layout} |")


def _write(path: str, rows, infos, fugaku, zb) -> None:
    ok = sum(1 for r in rows if _beats_all(r))
    feasible = [r for r in rows if r.ours is not None]
    tp_rows = [r for r in feasible if not r.layout.startswith("tp1 ")]
    lines = [
        "# Planner benchmark",
        "",
        "Predicted throughput (samples/s) from the planner's cost model and schedule simulator. The",
        "search covers tensor degrees (those the traced graph allows and that divide the device count;",
        "one degree for every stage) with stages, replicas, microbatches, schedule (1F1B, GPipe) and",
        "recompute; the baselines (uniform, parameter-balanced, time-balanced splits at tensor degree 1,",
        "each with every replica count D / p, every microbatch count and schedule the search tries,",
        "recompute where needed) are evaluated and picked on the same model",
        "(`rannc_py/planner/baselines.py`). Produced by `python benchmarks/plan_bench.py`.",
        "",
        *[f"- {i}" for i in infos],
        "",
        f"- ours >= every baseline: {ok} of {len(rows)} rows (the search includes degree 1 and the split rules'",
        "  best layouts, so this holds by construction).",
        f"- tensor parallelism chosen in {len(tp_rows)} of {len(feasible)} feasible rows; `tp1` column: the best plan",
        "  at tensor degree 1 (the planner before tensor parallelism), and the gain over it.",
        (f"- Search time per row (profile + tensor chains + search over every degree, excluding tracing and "
         f"finding the tensor splits): at most {max(r.cpu for r in rows):.2f} s CPU and "
         f"{max(r.wall for r in rows):.2f} s wall,"),
        "  on the 2-core development machine shared with other jobs (wall time includes waiting for a core).",
        "- MFU = model FLOPs (3 x the graph's forward FLOPs per sample x batch; recompute not counted)",
        "  / (step time x devices x peak FLOP/s of the model's dtype, fp32 here).",
        "- Layout: `tpT x Sst xR0/R1/... m=M schedule [rc]` = tensor degree T, S stages with R tensor groups",
        "  each, M microbatches, recompute on some stages; origin: `dp` the search's own candidates.",
        "",
        "Cost model assumptions (see `rannc_py/hardware/cluster.py`, `planner/cost.py`, `planner/tensor.py`,",
        "`profiling/analytic.py`):",
        "",
        "- Block times are a roofline from the graph's FLOPs and bytes, with kernels assumed to reach",
        "  70 % of peak FLOP/s and 80 % of memory bandwidth on A64FX, 80 % and 85 % on A100 (these",
        "  efficiencies are assumptions, not measurements); backward = 2 x forward.",
        "- Tensor degree t: split ops cost 1/t (a block's share weighed by each op's roofline time),",
        "  replicated ops in full; the group's collectives (allreduce after each row-parallel matmul and",
        "  the vocab-parallel embedding, the vocab-parallel cross-entropy's three small allreduces, the",
        "  backward allreduce of each replicated input of a column-parallel matmul, the allgather of",
        "  split outputs) on the critical path of every microbatch, alpha-beta on the group's link:",
        "  NVLink inside an A100 node (t = 2, 4, 8; 3 and 6 would straddle nodes and pay InfiniBand),",
        "  the Tofu-D link between neighbouring A64FX nodes; sharded parameters, gradients and optimizer",
        "  state / t, split activations / t.",
        "- Links: alpha-beta per message; A64FX: Tofu-D 6.8 GB/s, 0.49 us, 6 links driven at once,",
        "  dimension-wise torus allreduce on the job's 3-D shape; A100: NVLink 300 GB/s inside an",
        "  8-GPU node, 25 GB/s HDR InfiniBand per GPU across nodes. Gradient allreduce: fastest of ring,",
        "  recursive halving-doubling and (torus) dimension-wise, per stage's replica group (at degree t,",
        "  each tensor rank with the same rank of the other groups, 1/t of the sharded bytes each).",
        "- Sends overlap compute (nonblocking); the allreduce does not overlap the backward pass.",
        "- Memory: fp32 weights + grads + Adam state (16 B/parameter) + activations in flight",
        "  (1F1B: p - s microbatches, GPipe: m) or, with recompute, stage inputs only + one",
        "  microbatch's activations; send/receive buffers; a largest-parameter temporary; the",
        "  model's outputs for one microbatch on the last stage (training uses only the loss, as with",
        "  RaNNCModule(return_outputs=False)); 10 % margin.",
        "",
        ("| model | cluster | devices | search s (wall) | search s (CPU) | ours | MFU | tp1 | gain | uniform | params "
         "| time | ours >= all | layout (origin) |"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        *(_fmt_row(r) for r in rows),
    ]
    if fugaku is not None:
        lines += [
            "",
            "## Fugaku-LLM 13B on 13,824 A64FX nodes: the planner against the hand layout",
            "",
            "Both priced by the same cost model and simulator (the hand layout by `predict_plan`).",
            "",
            fugaku["text"],
        ]
    short = [r for r in rows if r.extra is not None]
    if short:
        lines += [
            "",
            "## Rows that do not fit at tensor degree 1 without optimizer sharding",
            "",
            "| model | cluster | devices | with optimizer sharding | with tensor parallelism | with both |",
            "|---|---|---|---|---|---|",
            *(f"| {r.name} | {r.preset} | {r.size} | {r.extra['shard']} | {r.extra['tp']} | {r.extra['both']} |"
              for r in short),
        ]
    if zb:
        lines += ["", *_schedule_lines(zb)]
    Path(path).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
