"""RaNNCModule with tensor-parallel stages trains as eager PyTorch does.

Usage: tp_module.py CASE [CASE ...], each CASE ``model:layout[:option,...]``, layout
``t2_p2_r1_m2_1f1b`` (tensor degree, stages, replicas per stage, microbatches, schedule);
options ``rc`` recompute, ``z1`` / ``z2`` the optimizer state sharded over each tensor
position's replicas at level 1 / 2, ``clip`` ``clip_grad_norm_(0.05)`` (the norms compared), ``state``
(after training: state_dict round trip into a tensor-degree-1 RaNNCModule, which then gives the
same losses; load_state_dict of eager's state; optimizer_state_dict equal to eager's and
load_optimizer_state_dict of it; save_checkpoint refused
with ConfigError), ``wrong`` (the group's sums deliberately
left undone: the comparison must fail), ``eval`` (after training, one call in ``eval()`` mode
under ``no_grad``: a program of its own, traced in eval mode and split alike, whose loss
equals eager's), ``meta`` (the model built on ``meta``, the optimizer a factory: each rank
materialises one module with split parameters at a time, keeps its shards and frees the full
tensors before the next; the eager reference is materialised from the same seed; the most
full split-parameter elements a rank holds at once must not exceed the largest module's).
Models: runtime_models.MODELS plus ``hf_gpt2_tied``
(GPT-2, a tied head whose vocabulary divides by 2), ``hf_bloom`` (BLOOM: batch and heads merged
for ``baddbmm`` with an ALiBi bias, a tied head) and ``mixed`` (tests/tp_models.py's MixedMLP,
one region no split can cross).

Every rank builds the same model and batches, trains its local rows for STEPS AdamW steps
and compares the loss every step, the replicated parameters' gradients across its tensor
group (equal: summed once, not per position) and, after the last step, every parameter of the
gathered state dict with eager's. Tolerance rtol 1e-5, atol 1e-5 on parameters (fp32): a
row-parallel matmul and a backward allreduce sum t partial results, so the summation order
differs from eager's; AdamW's eps is 1e-6 for the reason tests/mpi_scripts/tp_equiv.py gives
(an attention key bias's true gradient is zero, its rounding noise differs with the order, and
a smaller eps turns that noise into steps). A missing or misplaced sum changes the loss at the
1e-2 scale (``wrong``).
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from mpi4py import MPI
from runtime_equiv import eager_loss_scaled, run_cases
from runtime_models import build_model, call_kwargs, local_slice, make_batch

import rannc_py
from rannc_py.runtime.tensor_group import MPITensorGroup

STEPS, LOCAL = 5, 4
comm = MPI.COMM_WORLD
rank, world = comm.Get_rank(), comm.Get_size()


def model_of(name: str) -> torch.nn.Module:
    if name == "hf_gpt2_tied":
        from transformers import GPT2Config, GPT2LMHeadModel

        return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=4,
                                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False,
                                          bos_token_id=0, eos_token_id=0, tie_word_embeddings=True))
    if name == "hf_bloom":
        from transformers import BloomConfig, BloomForCausalLM

        return BloomForCausalLM(BloomConfig(vocab_size=64, hidden_size=32, n_layer=2, n_head=4, use_cache=False,
                                            bos_token_id=0, eos_token_id=0))
    if name == "mixed":
        from tp_models import MixedMLP

        return MixedMLP()
    return build_model(name)


def batch_of(name: str, rows: int, seed: int) -> dict[str, Any]:
    if name == "mixed":
        g = torch.Generator().manual_seed(seed)
        return {"x": torch.randn(rows, 16, 16, generator=g), "target": torch.randn(rows, 16, 4, generator=g)}
    return make_batch("hf_gpt2" if name in ("hf_gpt2_tied", "hf_bloom") else name, rows, seed)


def const_of(name: str) -> dict[str, Any]:
    return call_kwargs("hf_gpt2" if name == "hf_gpt2_tied" else name)


def parse(text: str) -> dict[str, Any]:
    t, p, r, m, sched = text.split("_")
    return {"tensor": int(t[1:]), "stages": int(p[1:]), "replicas": int(r[1:]), "microbatches": int(m[1:]),
            "schedule": sched}


def pair(name: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(1234)
    model, ref = model_of(name), model_of(name)
    ref.load_state_dict(model.state_dict())
    return model, ref


def adamw(params: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01, eps=1e-6)


def close(got: torch.Tensor, want: torch.Tensor, what: str, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=lambda e: f"{what}\n{e}")


def replicated_grads_agree(wrapped: rannc_py.RaNNCModule, case: str) -> int:
    """Every replicated parameter's gradient is bitwise the same on every rank of the tensor group."""
    tp = wrapped._tensor
    assert tp is not None, f"{case}: the stage is not split"
    group: MPITensorGroup = tp.group
    checked = 0
    for f, p in sorted(wrapped._params.items()):
        if f in tp.shards or p.grad is None:
            continue
        parts = group.all_gather(p.grad)
        assert all(torch.equal(parts[0], q) for q in parts), f"{case}: {f}'s gradient differs across the group"
        checked += 1
    return checked


def train(wrapped: rannc_py.RaNNCModule, opt: torch.optim.Optimizer, ref: torch.nn.Module,
          ropt: torch.optim.Optimizer, name: str, layout: dict[str, Any], opts: set[str], case: str) -> None:
    eager_layout = {**layout, "replicas": [layout["replicas"]] * layout["stages"]}
    for step in range(STEPS):
        batch = batch_of(name, LOCAL * world, seed=100 * step)
        out = wrapped(**local_slice(batch, rank, LOCAL), **const_of(name))
        out["loss"].backward()
        want = eager_loss_scaled(ref, batch, const_of(name), eager_layout, 1)
        close(out["loss"].detach(), want, f"{case} step {step} loss")
        if step == 0 and not layout["shard_optimizer"]:  # sharded: the gradients live in bucket shards
            assert replicated_grads_agree(wrapped, case) > 0 or "mixed" in case
        if "clip" in opts:
            norm = wrapped.clip_grad_norm_(0.05)
            rnorm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)
            assert rnorm > 0.05, f"{case}: the norm {rnorm} is not clipped"
            close(norm, rnorm, f"{case} step {step} norm")
        opt.step()
        opt.zero_grad()
        ropt.step()
        ropt.zero_grad()


def same_params(sd: dict[str, torch.Tensor], want: dict[str, torch.Tensor], case: str) -> None:
    if rank != 0:
        return
    assert list(sd) == list(want), f"{case}: keys {list(sd)} != {list(want)}"
    for k, v in want.items():
        close(sd[k], v, f"{case}: {k}", atol=1e-5)


def init(module: torch.nn.Module) -> None:
    """A meta module's initialisation (Hugging Face's Conv1D has no reset_parameters)."""
    for leaf, p in module.named_parameters(recurse=False):
        with torch.no_grad():
            if isinstance(module, torch.nn.LayerNorm) and leaf == "weight":
                p.fill_(1.0)
            elif leaf == "bias":
                p.uniform_(-0.1, 0.1)
            else:
                p.normal_(0.0, 0.05)


def meta_pair(name: str, degree: int) -> tuple[torch.nn.Module, torch.nn.Module, list[int], int, Any]:
    """A model on ``meta`` and its eager reference materialised as the runtime does (seed 1234);
    the full split-parameter elements the model holds after each materialisation (recorded until
    the returned function undoes the recording), and the largest module's."""
    from rannc_py import trace
    from rannc_py.graph.tensor_split import find_tensor_split
    from rannc_py.runtime import params as P

    torch.manual_seed(1234)
    with torch.device("meta"):
        model, ref = model_of(name), model_of(name)
    P.materialize(ref, list(P.canonical_names(ref).values()), 1234, init)
    split = find_tensor_split(trace(ref, (), {**batch_of(name, LOCAL, 0), **const_of(name)}).program, degree).params
    modules: dict[str, int] = {}
    for f in split:
        modules[f.rpartition(".")[0]] = modules.get(f.rpartition(".")[0], 0) + ref.get_parameter(f).numel()
    held: list[int] = []
    original = P.materialize

    def recording(m: torch.nn.Module, *args: Any, **kwargs: Any) -> None:
        original(m, *args, **kwargs)
        if m is model:
            held.append(sum(P.get_tensor(m, f).numel() for f in split if not P.get_tensor(m, f).is_meta))

    P.materialize = recording  # type: ignore[assignment]

    def restore() -> None:
        P.materialize = original  # type: ignore[assignment]

    return model, ref, held, max(modules.values()), restore


def run_case(case: str) -> None:
    name, layout_text, *rest = case.split(":")
    opts = set(rest[0].split(",")) if rest else set()
    layout = {**parse(layout_text), "recompute": "rc" in opts,
              "shard_optimizer": 2 if "z2" in opts else 1 if "z1" in opts else 0}
    if "meta" in opts:
        model, ref, held, largest, restore = meta_pair(name, layout["tensor"])
        ropt = adamw(ref.parameters())
        wrapped = rannc_py.RaNNCModule(model, adamw, plan=layout, param_init=init)
        batch = batch_of(name, LOCAL * world, seed=0)
        with torch.no_grad():
            wrapped(**local_slice(batch, rank, LOCAL), **const_of(name))  # places the model
        restore()
        assert held and 0 < max(held) <= largest, f"{case}: held {held} full split elements, largest module {largest}"
        assert wrapped.optimizer is not None
        train(wrapped, wrapped.optimizer, ref, ropt, name, layout, opts, case)
        same_params(wrapped.state_dict(rank0_only=False), ref.state_dict(), case)
        wrapped.close()
        if rank == 0:
            print(f"case {case}: ok", flush=True)
        return
    model, ref = pair(name)
    opt, ropt = adamw(model.parameters()), adamw(ref.parameters())
    wrapped = rannc_py.RaNNCModule(model, opt, plan=layout)
    if "wrong" in opts:
        original = MPITensorGroup.all_reduce
        MPITensorGroup.all_reduce = lambda self, t, op="sum": t.detach().clone() if op == "sum" else original(self, t, op)  # type: ignore[method-assign]
        try:
            train(wrapped, opt, ref, ropt, name, layout, opts, case)
        except AssertionError as e:
            assert "loss" in str(e), e
        else:
            raise AssertionError(f"{case}: training without the group's sums matched eager")
        finally:
            MPITensorGroup.all_reduce = original  # type: ignore[method-assign]
        wrapped.close()
        if rank == 0:
            print(f"case {case}: ok", flush=True)
        return
    train(wrapped, opt, ref, ropt, name, layout, opts, case)
    assert wrapped._tensor is not None and wrapped._tensor.shards, f"{case}: nothing was split"
    sd = wrapped.state_dict(rank0_only=False)
    same_params(sd, ref.state_dict(), case)
    if "eval" in opts:
        batch = batch_of(name, LOCAL * world, seed=5)
        wrapped.eval()
        ref.eval()
        with torch.no_grad():
            got = wrapped(**local_slice(batch, rank, LOCAL), **const_of(name))["loss"]
            want = ref(**batch, **const_of(name))["loss"]
        close(got, want, f"{case}: eval loss")
        wrapped.train()
        ref.train()
    if "state" in opts:
        check_optimizer_state(wrapped, ropt, case)
        check_state(wrapped, sd, ref, name, layout, case)
        refused(wrapped, case)
    wrapped.close()
    if rank == 0:
        print(f"case {case}: ok", flush=True)


def check_optimizer_state(wrapped: rannc_py.RaNNCModule, ropt: torch.optim.Optimizer, case: str) -> None:
    """optimizer_state_dict() joins the positions' shards into eager's optimizer state (within the
    training tolerance: the moments carry the gradients' summation order), and eager's state loaded
    with load_optimizer_state_dict comes back bitwise (each position takes its shard of it)."""
    want = ropt.state_dict()
    for attempt in ("trained", "loaded"):
        got = wrapped.optimizer_state_dict(rank0_only=False)
        assert [g["params"] for g in got["param_groups"]] == [g["params"] for g in want["param_groups"]], case
        assert sorted(got["state"]) == sorted(want["state"]), f"{case}: states of {sorted(got['state'])}"
        for i, st in want["state"].items():
            for k, v in st.items():
                g = got["state"][i][k]
                assert g.shape == v.shape, f"{case} {attempt}: state {i} {k} shape {tuple(g.shape)}"
                if attempt == "loaded" or v.dim() == 0:
                    assert torch.equal(g, v), f"{case} {attempt}: state {i} {k} differs"
                else:
                    close(g, v, f"{case}: state {i} {k}", rtol=1e-4, atol=1e-5 * float(v.abs().max()))
        wrapped.load_optimizer_state_dict(want)


def refused(wrapped: rannc_py.RaNNCModule, case: str) -> None:
    """What tensor > 1 does not support yet says so: checkpoints."""
    import tempfile

    from rannc_py.errors import ConfigError

    calls = [("save_checkpoint", lambda: rannc_py.save_checkpoint(tempfile.mkdtemp(), wrapped))]
    for what, call in calls:
        try:
            call()
        except ConfigError as e:
            assert "tensor > 1" in str(e), f"{case}: {what}: {e}"
        else:
            raise AssertionError(f"{case}: {what} ran with tensor > 1")


def check_state(wrapped: rannc_py.RaNNCModule, sd: dict[str, torch.Tensor], ref: torch.nn.Module, name: str,
                layout: dict[str, Any], case: str) -> None:
    """tp -> tp1: the gathered state loads into a tensor-degree-1 module (a pipeline of the same
    stages), whose state dict is then bitwise the same and whose loss on a new batch equals
    eager's; eager's state loads back into the tensor-parallel module exactly."""
    torch.manual_seed(99)
    other = rannc_py.RaNNCModule(model_of(name), plan={**layout, "tensor": 1, "replicas": None, "shard_optimizer": 0})
    batch = batch_of(name, LOCAL * world, seed=7)
    with torch.no_grad():
        other(**local_slice(batch, rank, LOCAL), **const_of(name))  # the first call places the model
    other.load_state_dict(sd)
    back = other.state_dict(rank0_only=False)
    for k, v in sd.items():
        assert torch.equal(back[k], v), f"{case}: {k} changed in the tp1 round trip"
    with torch.no_grad():
        got = other(**local_slice(batch, rank, LOCAL), **const_of(name))["loss"]
        want = ref(**batch, **const_of(name))["loss"]
    close(got, want, f"{case}: tp1 loss after loading")
    other.close()
    wrapped.load_state_dict(ref.state_dict())
    again = wrapped.state_dict(rank0_only=False)
    for k, v in ref.state_dict().items():
        assert torch.equal(again[k], v), f"{case}: {k} differs after load_state_dict"


if __name__ == "__main__":
    run_cases(run_case, sys.argv[1:])
