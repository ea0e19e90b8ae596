"""Programs per call signature and mode, on any number of ranks (a 2-stage pipeline from 2 ranks).

Checks: with dropout on, eval output equals the plain model's eval output
and repeats, and training after eval equals training without the eval calls;
a first call in eval mode, and one under no_grad; eval without labels, at
another batch size and sequence length, positionally; training with a new
sequence length every step equals eager; a call that cannot be mapped raises
a ConfigError naming the argument on every rank, and the job continues.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from mpi4py import MPI
from runtime_models import SEQ, VOCAB, build_model, call_kwargs, make_batch, run_checks, uneven_layout
from torch import nn

import rannc_py

comm = MPI.COMM_WORLD
rank, world = comm.Get_rank(), comm.Get_size()
LOCAL = 4
LAYOUT = uneven_layout(world)


class Tagger(nn.Module):
    """A model of keyword arguments and a dict output; ``reverse`` reads the head before the embedding."""

    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 32)
        self.l1, self.l2, self.head = nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 5)
        self.drop = nn.Dropout(dropout)

    def forward(self, tokens, *, mask=None, tags=None, reverse=False):
        if reverse:  # the embedding's input depends on the last stage's head: no stage can run it
            tokens = tokens + (self.head.weight.mean() > 1e9).long()
        h = self.emb(tokens)
        for layer in (self.l1, self.l2):
            h = torch.tanh(layer(self.drop(h)))
        if mask is not None:
            h = h * mask.unsqueeze(-1)
        out = {"logits": self.head(h)}
        if tags is not None:
            out = {"loss": F.cross_entropy(out["logits"].flatten(0, 1), tags.flatten()), **out}
        return out


def build(name: str, dropout: float = 0.0) -> nn.Module:
    return Tagger(dropout) if name == "tagger" else build_model(name, dropout)


def batch_of(name: str, rows: int, seed: int, seq: int = SEQ) -> dict:
    b = {k: v[:, :seq] if v.dim() > 1 else v for k, v in make_batch("gpt" if name == "tagger" else name, rows,
                                                                     seed).items()}
    if name == "tagger":
        return {"tokens": b["input_ids"], "mask": torch.ones(rows, seq), "tags": b["labels"] % 5}
    return {**b, **call_kwargs(name)}


def mine(batch: dict, local: int = LOCAL) -> dict:
    return {k: v[rank * local : (rank + 1) * local] if torch.is_tensor(v) else v for k, v in batch.items()}


def no_labels(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k not in ("labels", "next_sentence_label", "tags")}


def logits(out) -> torch.Tensor:
    """The per-token scores of any of the test models' outputs."""
    if isinstance(out, dict) and "logits" in out:
        return out["logits"]
    return out.logits if hasattr(out, "logits") else out.prediction_logits


def same_as_plain(wrapped, name: str, batch: dict) -> torch.Tensor:
    """Eval logits of the wrapped model equal the plain model's (from the gathered state); returns them."""
    with torch.random.fork_rng():  # building the reference must not move the wrapped model's dropout stream
        ref = build(name)
    ref.load_state_dict(comm.bcast(wrapped.state_dict(), root=0))
    ref.eval()
    with torch.no_grad():
        got = logits(wrapped(**mine(batch, batch_rows(batch) // world)))
        want = logits(ref(**batch))
    rows = batch_rows(batch) // world
    torch.testing.assert_close(got, want[rank * rows : (rank + 1) * rows], rtol=1e-5, atol=1e-6)
    return got


def batch_rows(batch: dict) -> int:
    return next(v.shape[0] for v in batch.values() if torch.is_tensor(v))


def train_steps(wrapped, opt, name: str, seeds: range, eval_between: bool) -> list[float]:
    losses = []
    for seed in seeds:
        wrapped.train()
        out = wrapped(**mine(batch_of(name, LOCAL * world, seed)))
        out["loss"].backward() if isinstance(out, dict) else out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(out["loss"] if isinstance(out, dict) else out.loss))
        if eval_between:
            wrapped.eval()
            first = same_as_plain(wrapped, name, batch_of(name, LOCAL * world, 99))
            again = same_as_plain(wrapped, name, batch_of(name, LOCAL * world, 99))
            torch.testing.assert_close(first, again, rtol=0, atol=0)
    return losses


def check_dropout_eval() -> None:
    for name in ("hf_gpt2", "bert", "tagger"):
        runs = []
        for eval_between in (True, False):
            torch.manual_seed(0)
            model = build(name, dropout=0.1)
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            wrapped = rannc_py.RaNNCModule(model, opt, plan=LAYOUT)
            torch.manual_seed(7 + rank)  # the dropout stream: the same for both runs
            runs.append((train_steps(wrapped, opt, name, range(3), eval_between), wrapped.state_dict()))
        assert runs[0][0] == runs[1][0], (name, runs[0][0], runs[1][0])
        for k in runs[0][1]:
            torch.testing.assert_close(runs[0][1][k], runs[1][1][k], rtol=0, atol=0)


def check_first_call_eval_and_no_grad() -> None:
    for name in ("hf_gpt2", "tagger"):
        torch.manual_seed(0)
        wrapped = rannc_py.RaNNCModule(build(name, dropout=0.5), plan=LAYOUT)
        wrapped.eval()
        batch = batch_of(name, LOCAL * world, 0)
        first = same_as_plain(wrapped, name, batch)
        torch.testing.assert_close(first, same_as_plain(wrapped, name, batch), rtol=0, atol=0)
    torch.manual_seed(0)
    wrapped = rannc_py.RaNNCModule(build("hf_gpt2"), plan=LAYOUT)
    with torch.no_grad():  # an empty cache: planning profiles with autograd on inside
        out = wrapped(**mine(batch_of("hf_gpt2", LOCAL * world, 0)))
    assert not out.loss.requires_grad


def check_other_inputs_then_train() -> None:
    for name in ("gpt", "hf_gpt2", "bert", "tagger"):
        torch.manual_seed(0)
        model, ref = build(name), build(name)
        ref.load_state_dict(model.state_dict())
        opt, ropt = torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.SGD(ref.parameters(), lr=0.1)
        wrapped = rannc_py.RaNNCModule(model, opt, plan=LAYOUT)
        for step in range(3):
            wrapped.train()
            batch = batch_of(name, LOCAL * world, step, seq=SEQ - 2 * step)  # each step another length
            out = wrapped(**mine(batch))
            loss = out["loss"] if isinstance(out, dict) else out.loss
            loss.backward()
            want = ref(**batch)
            (want["loss"] if isinstance(want, dict) else want.loss).backward()
            torch.testing.assert_close(loss, want["loss"] if isinstance(want, dict) else want.loss,
                                       rtol=1e-5, atol=1e-6)
            opt.step(), ropt.step(), opt.zero_grad(), ropt.zero_grad()
            # eval: no labels, half the batch, a shorter length
            wrapped.eval()
            short = no_labels(batch_of(name, 2 * world, 50 + step, seq=SEQ // 2 + step))
            same_as_plain(wrapped, name, short)
        if name in ("gpt", "hf_gpt2"):  # positionally
            ids = batch_of(name, 2 * world, 9, seq=7)["input_ids"]
            ref.eval()
            with torch.no_grad():
                got = logits(wrapped(ids[rank * 2 : (rank + 1) * 2]))
                want = logits(ref(ids))[rank * 2 : (rank + 1) * 2]
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def check_dynamic_padding() -> None:
    torch.manual_seed(0)
    model, ref = build("hf_gpt2"), build("hf_gpt2")
    ref.load_state_dict(model.state_dict())
    opt, ropt = torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.SGD(ref.parameters(), lr=0.1)
    wrapped = rannc_py.RaNNCModule(model, opt, plan=LAYOUT)
    for step, seq in enumerate((16, 9, 12, 5, 14)):
        batch = batch_of("hf_gpt2", LOCAL * world, step, seq=seq)
        out = wrapped(**mine(batch))
        out.loss.backward()
        want = ref(**batch).loss
        want.backward()
        torch.testing.assert_close(out.loss, want, rtol=1e-5, atol=1e-6)
        opt.step(), ropt.step(), opt.zero_grad(), ropt.zero_grad()
    state = comm.bcast(wrapped.state_dict(), root=0)
    for k, v in ref.state_dict().items():
        if k in state:
            torch.testing.assert_close(state[k], v, rtol=1e-5, atol=1e-6)


def check_mismatch_is_catchable() -> None:
    torch.manual_seed(0)
    model = Tagger()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    wrapped = rannc_py.RaNNCModule(model, opt, plan=LAYOUT)
    batch = batch_of("tagger", LOCAL * world, 0)
    wrapped(**mine(batch))["loss"].backward()
    if world > 1:
        try:
            wrapped(**mine(batch), reverse=True)
        except rannc_py.ConfigError as e:
            assert "`reverse` was not given on the first call and is given now" in str(e), str(e)
        else:
            raise AssertionError("a call that no stage can run did not raise")
    out = wrapped(**mine(batch_of("tagger", LOCAL * world, 1)))  # the job goes on
    out["loss"].backward()
    assert torch.isfinite(out["loss"])


if __name__ == "__main__":
    run_checks(globals(), sys.argv[1:])
