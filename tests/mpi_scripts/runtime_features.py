"""Runtime behaviours beyond equivalence, on any number of ranks (2-stage pipeline).

Checks: eval output equals eager eval output (logits on this rank's rows, loss);
``torch.no_grad`` runs forward-only; tied weights stay equal on every rank;
state_dict round-trips into the unwrapped model and load_state_dict works after
steps; with dropout on, recompute gives exactly the losses and parameters of no
recompute; a meta-device model trains, materialising only local parameters;
parameters are copied from rank 0 at setup (rank 1 perturbs its model first);
batch norm follows train()/eval() (any world size, 1 included); the
data-parallel allreduce starts during backward.
"""

from __future__ import annotations

import sys

import torch
from mpi4py import MPI
from runtime_models import build_model, make_batch, rows_slice, run_checks, uneven_layout

import rannc_py

comm = MPI.COMM_WORLD
rank, world = comm.Get_rank(), comm.Get_size()
LOCAL = 4
LAYOUT = uneven_layout(world)


def local_rows(batch: dict) -> dict:
    return {k: v[rank * LOCAL : (rank + 1) * LOCAL] for k, v in batch.items()}


def train(model, steps: int, recompute: bool) -> tuple[list[float], dict]:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    wrapped = rannc_py.RaNNCModule(model, opt, plan=dict(LAYOUT, recompute=recompute))
    losses = []
    torch.manual_seed(7 + rank)  # dropout stream; the same for both runs
    for step in range(steps):
        out = wrapped(**local_rows(make_batch("gpt", LOCAL * world, seed=step)))
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    return losses, wrapped.state_dict()


def check_eval_and_state() -> None:
    torch.manual_seed(0)
    model = build_model("gpt", dropout=0.1)
    ref = build_model("gpt", dropout=0.1)
    ref.load_state_dict(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    wrapped = rannc_py.RaNNCModule(model, opt, plan=LAYOUT)
    batch = make_batch("gpt", LOCAL * world, seed=0)
    wrapped(**local_rows(batch)).loss.backward()
    opt.step()
    opt.zero_grad()
    # the unwrapped model after the same step, from the gathered state
    sd = comm.bcast(wrapped.state_dict(), root=0)
    ref.load_state_dict(sd)
    ref.eval()
    wrapped.eval()
    out = wrapped(**local_rows(batch))
    with torch.no_grad():
        rows = batch["input_ids"].shape[0] // 2
        want_logits = ref(**batch).logits[rank * LOCAL : (rank + 1) * LOCAL]
        want_loss = sum(ref(**{k: v[i * rows : (i + 1) * rows] for k, v in batch.items()}).loss for i in range(2)) / 2
    torch.testing.assert_close(out.logits, want_logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss, want_loss, rtol=1e-5, atol=1e-6)
    assert not out.loss.requires_grad
    # no_grad in train mode: forward only, nothing to backpropagate
    wrapped.train()
    with torch.no_grad():
        assert not wrapped(**local_rows(batch)).loss.requires_grad
    # tied weights: every rank holding wte/lm_head holds the same values
    mine = dict(wrapped.named_parameters()).get("transformer.wte.weight")
    held = comm.allgather(None if mine is None else mine.detach())
    held = [t for t in held if t is not None]
    assert len(held) >= 2, "the tied weight should live on both stages"
    for t in held[1:]:
        torch.testing.assert_close(t, held[0], rtol=0, atol=0)
    # load_state_dict after steps: back to the initial weights, same loss as a fresh eager model
    torch.manual_seed(0)
    fresh = build_model("gpt", dropout=0.1)
    wrapped.load_state_dict(fresh.state_dict())
    wrapped.eval()
    fresh.eval()
    with torch.no_grad():
        got = wrapped(**local_rows(batch)).loss
        want = sum(fresh(**{k: v[i * rows : (i + 1) * rows] for k, v in batch.items()}).loss for i in range(2)) / 2
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def check_recompute_replays_dropout() -> None:
    torch.manual_seed(0)
    a = build_model("gpt", dropout=0.2)
    b = build_model("gpt", dropout=0.2)
    b.load_state_dict(a.state_dict())
    la, sa = train(a, 3, recompute=False)
    lb, sb = train(b, 3, recompute=True)
    assert la == lb, (la, lb)
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0)
    # and dropout is really on: eval loss differs from train loss
    assert len(set(la)) == len(la)


def check_meta() -> None:
    with torch.device("meta"):
        model = build_model("gpt")
    wrapped = rannc_py.RaNNCModule(
        model, lambda params: torch.optim.AdamW(params, lr=1e-3), plan=LAYOUT
    )
    for step in range(2):
        out = wrapped(**local_rows(make_batch("gpt", LOCAL * world, seed=step)))
        out.loss.backward()
        wrapped.optimizer.step()
        wrapped.optimizer.zero_grad()
    assert torch.isfinite(out.loss)
    mine = {n for n, _ in wrapped.named_parameters()}
    total = {n for n, _ in build_model("gpt").named_parameters()}
    assert mine < total, "a rank materialised the whole model"
    # materialised copies of the tied weight agree (same seed per module)
    t = dict(wrapped.named_parameters()).get("transformer.wte.weight")
    held = [x for x in comm.allgather(None if t is None else t.detach()) if x is not None]
    for x in held[1:]:
        torch.testing.assert_close(x, held[0], rtol=0, atol=0)


def check_copy_from_rank0() -> None:
    for layout in (LAYOUT, {"stages": 1, "replicas": [world], "microbatches": 2}):
        torch.manual_seed(0)
        model = build_model("gpt")
        ref = build_model("gpt")
        ref.load_state_dict(model.state_dict())
        if rank == 1:  # built with another seed: rank 0's values must win, as with DDP
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn_like(p))
        wrapped = rannc_py.RaNNCModule(model, torch.optim.SGD(model.parameters(), lr=0.1), plan=layout)
        wrapped.eval()
        batch = make_batch("gpt", LOCAL * world, seed=0)
        with torch.no_grad():
            got = wrapped(**local_rows(batch)).loss
            rows = LOCAL * world // 2
            want = sum(ref(**rows_slice(batch, i * rows, (i + 1) * rows)).loss for i in range(2)) / 2
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        sd = wrapped.state_dict()
        if rank == 0:
            for k, v in ref.state_dict().items():
                torch.testing.assert_close(sd[k], v, rtol=0, atol=0)


def check_batchnorm() -> None:
    torch.manual_seed(0)
    model = build_model("cnn")
    ref = build_model("cnn")
    ref.load_state_dict(model.state_dict())
    layout = dict(LAYOUT, replicas=[1] * LAYOUT["stages"]) if world <= 2 else None
    assert layout is not None, "batch norm check runs on 1 or 2 ranks (no replicas: their statistics differ)"
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ropt = torch.optim.SGD(ref.parameters(), lr=0.1)
    wrapped = rannc_py.RaNNCModule(model, opt, plan=layout)
    rows = LOCAL * world // 2
    for step in range(2):
        batch = make_batch("cnn", LOCAL * world, seed=step)
        wrapped(**local_rows(batch))["loss"].backward()
        for i in range(2):  # eager: the same microbatches, running statistics updated per microbatch
            (ref(**rows_slice(batch, i * rows, (i + 1) * rows))["loss"] / 2).backward()
        opt.step(), ropt.step(), opt.zero_grad(), ropt.zero_grad()
    before = wrapped.state_dict()
    wrapped.eval()
    ref.eval()
    batch = make_batch("cnn", LOCAL * world, seed=9)
    out = wrapped(**local_rows(batch))
    with torch.no_grad():
        want = ref(**batch)["logits"][rank * LOCAL : (rank + 1) * LOCAL]
    torch.testing.assert_close(out["logits"], want, rtol=1e-5, atol=1e-6)
    after = wrapped.state_dict()
    if rank == 0:
        for k, v in ref.state_dict().items():  # training updated running stats like eager; eval left them
            torch.testing.assert_close(before[k], v, rtol=1e-5, atol=1e-6, msg=lambda e, k=k: f"{k}: {e}")
            torch.testing.assert_close(after[k], before[k], rtol=0, atol=0)
        assert int(after["blocks.0.bn1.num_batches_tracked"]) == 4  # 2 steps x 2 microbatches


def check_overlap() -> None:
    torch.manual_seed(0)
    model = build_model("gpt")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    # small buckets: several per step, most of them complete before backward ends
    wrapped = rannc_py.RaNNCModule(model, opt, plan={"stages": 1, "replicas": [world], "microbatches": 2},
                                   bucket_bytes=16 * 1024)
    wrapped(**local_rows(make_batch("gpt", LOCAL * world, seed=0))).loss.backward()
    sync = wrapped._sync
    started = sync.started_in_backward
    total = sum(len(b) for _, b in sync._groups)
    assert total >= 3, total
    assert started >= total - 1, f"only {started} of {total} buckets started during backward"


if __name__ == "__main__":
    run_checks(globals(), sys.argv[1:])
