"""Train with sharded optimizer steps (levels 1 and 2) and compare with eager PyTorch in-process.

Usage: shard_equiv.py CASE [CASE ...], each CASE ``model:layout:level:optimizer[:option,...]``,
e.g. ``gpt:p2_r2x2_m2_1f1b:2:adam2:accum,clip``. Layouts as in runtime_equiv.py;
level: the ``shard_optimizer`` of the layout (one level for every stage);
optimizers (:func:`make_optimizer`): ``adamw``, ``adam2`` (Adam, two param
groups, a LambdaLR scheduler), ``sgdm`` (SGD with momentum), ``fused``
(rannc_py's FusedAdamW), ``normsgd`` (a per-tensor normalised update, which
must fall back to level 0 with a warning), each also as ``factory-KIND``
(RaNNCModule makes it on each rank's parameters); options: ``accum`` (two calls
per step), ``clip`` (``clip_grad_norm_``). After STEPS steps, losses (every
rank), the gathered state dict and optimizer state dict (rank 0, against
the eager optimizer's) and each rank's optimizer state bytes (its whole
parameters' and its pieces' share of eager's) are checked.
"""

from __future__ import annotations

import sys
import warnings

import torch
from mpi4py import MPI
from runtime_equiv import parse_layout, run_cases, step_gradients
from runtime_models import build_model, call_kwargs

import rannc_py
from rannc_py.optim import FusedAdamW

STEPS = 5
comm = MPI.COMM_WORLD
rank, world = comm.Get_rank(), comm.Get_size()


class NormalisedSGD(torch.optim.Optimizer):
    """``p -= lr * g / |g|`` per tensor: not element-wise, so it cannot be sharded."""

    def __init__(self, params, lr: float = 1e-3) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad / (p.grad.norm() + 1e-6), alpha=-group["lr"])


def make_optimizer(kind: str, model):
    """``(optimizer, scheduler or None)`` of kind ``kind`` over ``model``'s parameters (or a parameter list)."""
    params = list(model.parameters()) if isinstance(model, torch.nn.Module) else list(model)
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01, eps=1e-6), None
    if kind == "adam2":
        matrices = [p for p in params if p.dim() >= 2]
        rest = [p for p in params if p.dim() < 2]
        opt = torch.optim.Adam([{"params": matrices, "weight_decay": 0.01}, {"params": rest, "lr": 2e-3}],
                               lr=1e-3, eps=1e-6)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    if kind == "sgdm":
        return torch.optim.SGD(params, lr=0.05, momentum=0.9), None
    if kind == "fused":
        return FusedAdamW(params, lr=1e-3, weight_decay=0.01, eps=1e-6), None
    if kind == "normsgd":
        return NormalisedSGD(params, lr=1e-3), None
    raise ValueError(f"unknown optimizer kind {kind!r}")


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of the optimizer's state tensors with more than one dimension's worth (not step counts)."""
    return sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values()
               if isinstance(v, torch.Tensor) and v.dim() > 0)


def run_case(case: str) -> None:
    name, layout_text, level, kind, *opts = case.split(":")
    opts = set(opts[0].split(",")) if opts else set()
    layout = parse_layout(layout_text)
    layout["shard_optimizer"] = int(level)
    torch.manual_seed(1234)
    model = build_model(name, dropout=0.0)
    ref = build_model(name, dropout=0.0)
    ref.load_state_dict(model.state_dict())
    factory = kind.startswith("factory-")  # the optimizer made by RaNNCModule on this rank's parameters
    kind = kind.removeprefix("factory-")
    opt, sched = (None, None) if factory else make_optimizer(kind, model)
    ropt, rsched = make_optimizer(kind, ref)
    wrapped = rannc_py.RaNNCModule(model, (lambda ps: make_optimizer(kind, ps)[0]) if factory else opt, plan=layout)
    const = call_kwargs(name)
    calls = 2 if "accum" in opts else 1
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        train(wrapped, ref, opt, ropt, (sched, rsched), name, const, layout, calls, opts, case)
    fell_back = [w for w in seen if "runs unsharded (level 0)" in str(w.message)]
    assert bool(fell_back) == (kind == "normsgd"), f"{case}: fallback warnings {[str(w.message) for w in seen]}"
    stage = wrapped.plan.stage_of_rank(rank)
    ranks = wrapped.plan.stages[stage].ranks
    sharded = bool(wrapped._shards.shard_params())
    assert sharded == (len(ranks) > 1 and int(level) > 0 and kind != "normsgd"), f"{case}: sharded={sharded}"
    if sharded:  # the reduce-scatters overlap the last backward as the allreduces do
        assert wrapped._sync.started_in_backward > 0, f"{case}: no bucket started during backward"
    check_state_bytes(wrapped.optimizer, ref, ropt, wrapped, case)
    sd = wrapped.state_dict()
    osd = wrapped.optimizer_state_dict()
    if rank == 0:
        for k, v in ref.state_dict().items():
            torch.testing.assert_close(sd[k], v, rtol=1e-5, atol=1e-6, msg=lambda e, k=k: f"{case}: {k}\n{e}")
        assert_same_optimizer_state(osd, ropt.state_dict(), case)
        print(f"case {case}: ok", flush=True)


def assert_same_optimizer_state(got: dict, want: dict, case: str) -> None:
    """Two torch-format optimizer state dicts agree: groups exactly, state tensors to fp32 rounding."""
    assert got["param_groups"] == want["param_groups"], f"{case}: {got['param_groups']} != {want['param_groups']}"
    assert sorted(got["state"]) == sorted(want["state"]), f"{case}: state of {sorted(got['state'])}"
    for i, st in want["state"].items():
        assert sorted(got["state"][i]) == sorted(st), f"{case}: parameter {i} state keys {sorted(got['state'][i])}"
        for k, v in st.items():
            torch.testing.assert_close(got["state"][i][k], v, rtol=1e-5, atol=1e-6,
                                       msg=lambda e, i=i, k=k: f"{case}: optimizer state {i}.{k}\n{e}")


def train(wrapped, ref, opt, ropt, scheds, name, const, layout, calls, opts, case) -> None:
    for step in range(STEPS):
        step_gradients(wrapped, ref, name, const, layout, calls, opts, step, case)
        wrapped.optimizer.step()  # opt, or the one its factory made at the first call
        ropt.step()
        for s in scheds:
            if s is not None:
                s.step()
        if step % 2:
            wrapped.zero_grad()  # the module's zero_grad reaches the shards as the optimizer's does
        else:
            wrapped.optimizer.zero_grad()
        ropt.zero_grad()


def check_state_bytes(opt, ref, ropt, wrapped, case) -> None:
    """This rank keeps eager's state of its whole parameters, and of its pieces of the sharded ones."""
    names = {id(p): n for n, p in wrapped.named_parameters()}
    pieces = [pc for pcs in wrapped._shards.pieces.values() for pc in pcs]
    sharded = wrapped._shards.sharded
    whole = sum(state_bytes_of(ropt, ref.get_parameter(n)) for i, n in names.items() if i not in sharded)
    parts = sum(state_bytes_of(ropt, ref.get_parameter(names[id(pc.param)])) * (pc.hi - pc.lo) // pc.param.numel()
                for pc in pieces)
    unsharded = sum(state_bytes_of(ropt, ref.get_parameter(n)) for n in names.values())
    assert state_bytes(opt) == whole + parts, f"{case}: rank {rank} keeps {state_bytes(opt)}, want {whole + parts}"
    if pieces and unsharded:
        assert whole + parts < unsharded, f"{case}: rank {rank} keeps {whole + parts} of {unsharded} state bytes"


def state_bytes_of(opt, p) -> int:
    return sum(v.numel() * v.element_size() for v in opt.state.get(p, {}).values()
               if isinstance(v, torch.Tensor) and v.dim() > 0)


if __name__ == "__main__":
    run_cases(run_case, sys.argv[1:])
