"""Tensor-parallel training throughput: rannc_py's tensor groups against torch's DTensor and eager.

Run from the repository root (it launches ``mpiexec`` itself):

    python benchmarks/tp_runtime_bench.py [--steps 5] [--warmup 2] [--batch 8] [--out FILE]

Model: Hugging Face ``LlamaForCausalLM`` from a config (6 layers x 512 hidden, 8 heads, MLP
1408, seq 128, vocab 8192, no dropout), AdamW, global batch ``--batch``, 1 torch thread per
rank. Configurations, each in its own process(es):

  * eager, 1 process;
  * rannc_py, 2 ranks, ``plan=dict(stages=1, tensor=2)``: the split found in the traced graph
    (q/k/v/gate/up column-parallel, o/down row-parallel, embedding and head over the
    vocabulary with a vocab-parallel cross-entropy), each rank passing half the batch (the
    tensor group runs all of it);
  * torch DTensor, 2 ranks (gloo): ``parallelize_module`` with the hand-written Megatron plan
    (``ColwiseParallel`` on q/k/v/gate/up, ``RowwiseParallel`` on o/down; embedding, norms and
    head replicated), both ranks fed the whole batch.

A launch reports the median of ``--steps`` timed steps after ``--warmup`` steps (rannc_py's
first, tracing call is a warm-up step; a 2-rank step is the slower rank's) and the loss of the
first step (equal in every configuration: the same weights and batches).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
MPIEXEC = str(Path(sys.executable).parent / "mpiexec")


def build() -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=8192, hidden_size=512, intermediate_size=1408, num_hidden_layers=6,
                      num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=128, use_cache=False,
                      bos_token_id=0, eos_token_id=0, attention_dropout=0.0)
    return LlamaForCausalLM(cfg)


def batches(rows: int, count: int) -> list[Any]:
    import torch

    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 8192, (rows, 128), generator=g) for _ in range(count)]


def worker(kind: str, steps: int, warmup: int, rows: int) -> None:
    import torch

    torch.set_num_threads(1)
    rank, world = int(os.environ.get("PMI_RANK", "0")), int(os.environ.get("PMI_SIZE", "1"))
    model = build()
    ids = batches(rows, steps + warmup)
    if kind == "rannc":
        import rannc_py

        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        wrapped = rannc_py.RaNNCModule(model, opt, plan={"stages": 1, "tensor": world})
        local = rows // world

        def step(x: Any) -> float:
            out = wrapped(input_ids=x[rank * local:(rank + 1) * local], labels=x[rank * local:(rank + 1) * local],
                          use_cache=False)
            out.loss.backward()
            opt.step()
            opt.zero_grad()
            return float(out.loss)
    elif kind == "dtensor":
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29533")
        dist.init_process_group("gloo", rank=rank, world_size=world)
        mesh = init_device_mesh("cpu", (world,))
        plan = {f"self_attn.{n}": ColwiseParallel() for n in ("q_proj", "k_proj", "v_proj")}
        plan.update({"self_attn.o_proj": RowwiseParallel(), "mlp.gate_proj": ColwiseParallel(),
                     "mlp.up_proj": ColwiseParallel(), "mlp.down_proj": RowwiseParallel()})
        for layer in model.model.layers:
            parallelize_module(layer, mesh, plan)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step(x: Any) -> float:
            out = model(input_ids=x, labels=x, use_cache=False)
            out.loss.backward()
            opt.step()
            opt.zero_grad()
            return float(out.loss)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step(x: Any) -> float:
            out = model(input_ids=x, labels=x, use_cache=False)
            out.loss.backward()
            opt.step()
            opt.zero_grad()
            return float(out.loss)

    times, first = [], None
    for k, x in enumerate(ids):
        start = time.perf_counter()
        loss = step(x)
        times.append(time.perf_counter() - start)
        first = loss if first is None else first
    print("RESULT " + json.dumps({"rank": rank, "step": statistics.median(times[warmup:]), "loss": first}), flush=True)


def launch(kind: str, ranks: int, args: argparse.Namespace) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--worker", kind, "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--batch", str(args.batch)]
    if ranks > 1:
        cmd = [MPIEXEC, "-n", str(ranks), *cmd]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RANNC_TORCH_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600, check=True).stdout
    results = [json.loads(line[7:]) for line in out.splitlines() if line.startswith("RESULT ")]
    return {"step": max(r["step"] for r in results), "loss": results[0]["loss"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", default=None)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.steps, args.warmup, args.batch)
        return
    rows = [("eager, 1 process", "eager", 1), ("rannc_py, tensor degree 2", "rannc", 2),
            ("torch DTensor, Megatron plan, gloo", "dtensor", 2)]
    got = {name: launch(kind, n, args) for name, kind, n in rows}
    lines = ["| configuration | ranks | step (ms) | samples/s | loss of step 1 |", "|---|---|---|---|---|"]
    for name, _, n in rows:
        r = got[name]
        lines.append(f"| {name} | {n} | {r['step'] * 1e3:.0f} | {args.batch / r['step']:.2f} | {r['loss']:.5f} |")
    rannc, dtensor = got["rannc_py, tensor degree 2"], got["torch DTensor, Megatron plan, gloo"]
    lines.append("")
    lines.append(f"rannc_py / DTensor samples/s: {dtensor['step'] / rannc['step']:.2f}x; "
                 f"rannc_py / eager: {got['eager, 1 process']['step'] / rannc['step']:.2f}x")
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
