"""A GPT built on the ``meta`` device trains on every rank within the plan's predicted memory.

The full model's training state (parameters, gradients, Adam's two moments)
is about 4 x 210 MiB, more than any rank may hold (``memory_limit``). Each
rank materialises only its stage (``param_init``), takes two AdamW steps (the
second holds moments, gradients and activations at once), and its peak RSS
must stay below the Python/torch/MPI runtime's (the rank's peak RSS before
the model is built: torch, mpi4py and rannc_py imported, 240-300 MiB
depending on the environment) plus the plan's predicted memory for it plus
ALLOWANCE_MIB. The allowance covers what the plan does not count: tracing
with torch.export (about 115 MiB of code and caches, once) and freed memory
the C allocator keeps mapped. Measured on 4 ranks: peak - idle - predicted
was 184-216 MiB. A rank that materialised every parameter would hold
144-160 MiB more than its stage's, above the allowance.
"""

from __future__ import annotations

import resource
import sys

import torch
from mpi4py import MPI
from torch import nn

import rannc_py
from rannc_py.models.gpt import GPT, GPTConfig

ALLOWANCE_MIB = 260
comm = MPI.COMM_WORLD
rank, world = comm.Get_rank(), comm.Get_size()


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def init(module: nn.Module) -> None:
    """Small normal weights, zero biases, unit LayerNorm scales."""
    for name, p in module.named_parameters(recurse=False):
        with torch.no_grad():
            if isinstance(module, nn.LayerNorm) and name == "weight":
                p.fill_(1.0)
            elif name == "bias":
                p.zero_()
            else:
                p.normal_(0.0, 0.02)


def main() -> None:
    baseline = peak_mib()
    cfg = GPTConfig(vocab_size=8192, block_size=32, n_layer=16, n_head=8, n_embd=512)
    with torch.device("meta"):
        model = GPT(cfg)
    full = sum(p.numel() for p in model.parameters()) * 4 * 4 / 2**20  # params, grads, 2 Adam moments
    wrapped = rannc_py.RaNNCModule(
        model, lambda ps: torch.optim.AdamW(ps, lr=1e-4), param_init=init,
        cluster=f"a64fx:nodes={world}", memory_limit=f"{int(full * 0.6)}MiB",
    )
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (4, cfg.block_size), generator=g)
    for _ in range(2):  # the second step holds Adam's moments, gradients and activations at once
        out = wrapped(input_ids=ids, labels=ids)
        out.loss.backward()
        wrapped.optimizer.step()
        wrapped.optimizer.zero_grad()
        assert torch.isfinite(out.loss)
    plan = wrapped.plan
    predicted = plan.peak_memory_per_rank[rank] / 2**20
    peak = peak_mib()
    peaks = comm.gather((rank, baseline, peak, predicted), root=0)
    if rank == 0:
        print(plan.summary())
        print(f"full training state {full:.0f} MiB; allowance {ALLOWANCE_MIB} MiB")
        for r, b, p, pred in peaks:
            print(f"rank {r}: idle {b:.0f} MiB, peak {p:.0f} MiB, predicted {pred:.0f} MiB")
        assert plan.num_stages > 1, "the limit should force a pipeline"
        bad = [(r, p, pred) for r, idle, p, pred in peaks if p - idle > pred + ALLOWANCE_MIB]
        assert not bad, f"peak RSS above idle + predicted + {ALLOWANCE_MIB} MiB: {bad}"
        print("memory: ok", flush=True)


if __name__ == "__main__":
    try:
        main()
    except BaseException:  # noqa: BLE001 - any failure must abort every rank
        import traceback

        traceback.print_exc()
        sys.stderr.flush()
        comm.Abort(1)
