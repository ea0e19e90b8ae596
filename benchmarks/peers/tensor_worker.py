"""Worker of the tensor-parallel benchmark: a Hugging Face Llama trained by eager PyTorch, rannc_py or DTensor.

Launched by ``benchmarks/tensor_bench.py`` (``mpiexec -n N`` for the
multi-rank kinds). Prints one ``RESULT {json}`` line (rank 0).

Model: ``transformers.LlamaForCausalLM`` built from a config (never
downloaded): ``--layers`` x ``--hidden``, ``--heads`` attention heads and
``--kv-heads`` key/value heads (grouped-query attention when fewer), SwiGLU
MLP of ``--ffn`` features, vocabulary ``--vocab``, sequence 128, untied head;
AdamW; the same seed, so every kind trains the same model on the same batches.

Kinds:
  eager    single process (``--threads`` torch threads).
  rannc    ``RaNNCModule`` with ``--tensor`` T: the explicit layout
           ``plan=dict(stages=1, tensor=T, replicas=world // T)`` (``--tensor 0``:
           the planner chooses everything; its predicted step is reported).
  dtensor  torch's tensor parallelism (``torch.distributed.tensor.parallel``,
           gloo) with the hand-written Megatron plan: ``ColwiseParallel`` on
           q/k/v/gate/up and ``RowwiseParallel`` on o/down in every layer, the
           embedding, norms and head replicated, on all ranks as one group.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch

# isort: split
# common is the module beside this script (its folder is sys.path[0]); the repository
# root stays off the path, so the installed rannc_py is the one measured.
from common import emit, launch_rank, median_step, worker_parser

SEQ = 128


def build_llama(args: Any) -> torch.nn.Module:
    """The benchmark's Llama (seeded, dropout off)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=args.kv_heads, max_position_embeddings=SEQ, tie_word_embeddings=False,
                      attention_dropout=0.0)
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg)


def batch(args: Any, step: int) -> torch.Tensor:
    """Step ``step``'s global batch of token ids (``--batch`` rows x 128), the labels being the same ids."""
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, args.vocab, (args.batch, SEQ), generator=g)


def train_step(model: Any, opt: torch.optim.Optimizer, ids: torch.Tensor, losses: list[float]) -> None:
    """One step on ``ids`` (the labels too); its loss appended to ``losses``."""
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    losses.append(float(loss.detach()))


def run_eager(args: Any) -> None:
    model = build_llama(args)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    losses: list[float] = []

    def step(i: int) -> None:
        train_step(model, opt, batch(args, i), losses)

    med, times, busy = median_step(step, args.warmup, args.steps)
    emit({"step": med, "times": times, "losses": losses, "cpu": [busy]})


def run_rannc(args: Any) -> None:
    from mpi4py import MPI

    import rannc_py

    comm = MPI.COMM_WORLD
    rank, world = comm.Get_rank(), comm.Get_size()
    model = build_llama(args)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    plan = None if args.tensor == 0 else {"stages": 1, "tensor": args.tensor, "replicas": world // args.tensor}
    wrapped = rannc_py.RaNNCModule(model, opt, plan=plan, return_outputs=False)
    rows = args.batch // world
    losses: list[float] = []

    def step(i: int) -> None:
        # every rank passes its slice of the global batch, as with DDP
        train_step(wrapped, opt, batch(args, i)[rank * rows:(rank + 1) * rows], losses)

    t0 = time.perf_counter()
    step(0)  # traces, plans, places the shards
    setup = time.perf_counter() - t0
    med, times, busy = median_step(lambda i: step(i + 1), args.warmup - 1, args.steps)
    meds = comm.gather(med, root=0)
    cpu = comm.gather(busy, root=0)
    if rank == 0:
        p = wrapped.plan
        layout = "; ".join(f"stage {st.index}: x{st.replicas} tensor {st.tensor}" for st in p.stages)
        emit({"step": max(meds), "times": times, "losses": losses, "first_call": setup, "cpu": cpu,
              "predicted": p.step_time or None, "layout": f"{layout}; m={p.microbatches} {p.schedule}"})


def megatron_plan(model: torch.nn.Module) -> dict[str, Any]:
    """The hand-written plan of torch's tensor-parallel API for every decoder layer of ``model``."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    plan: dict[str, Any] = {}
    for i in range(len(model.model.layers)):
        pre = f"model.layers.{i}"
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
            plan[f"{pre}.{name}"] = ColwiseParallel()
        for name in ("self_attn.o_proj", "mlp.down_proj"):
            plan[f"{pre}.{name}"] = RowwiseParallel()
    return plan


def run_dtensor(args: Any) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    rank, world = launch_rank()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(args.port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    model = build_llama(args)
    model = parallelize_module(model, mesh, megatron_plan(model))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    losses: list[float] = []

    def step(i: int) -> None:
        train_step(model, opt, batch(args, i), losses)  # every rank of the group runs the whole batch

    med, times, busy = median_step(step, args.warmup, args.steps)
    meds: list[Any] = [None] * world
    dist.all_gather_object(meds, med)
    cpu: list[Any] = [None] * world
    dist.all_gather_object(cpu, busy)
    if rank == 0:
        emit({"step": max(meds), "times": times, "losses": losses, "cpu": cpu})
    dist.destroy_process_group()


def main() -> None:
    ap = worker_parser(__doc__.splitlines()[0])
    ap.add_argument("kind", choices=["eager", "rannc", "dtensor"])
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--ffn", type=int, default=1376)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tensor", type=int, default=2, help="rannc: tensor degree (0: the planner chooses)")
    ap.add_argument("--port", type=int, default=29531)
    ap.set_defaults(layers=6, hidden=512, vocab=8192)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    {"eager": run_eager, "rannc": run_rannc, "dtensor": run_dtensor}[args.kind](args)


if __name__ == "__main__":
    main()
