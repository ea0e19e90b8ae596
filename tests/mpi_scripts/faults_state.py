"""``load_state_dict`` / ``state_dict`` on 2 ranks (2 stages): every rank raises the same error.

The bad key is a parameter of one stage only (the last layer's MLP, on stage
1; or the position embedding, on stage 0), so only one rank holds it. Checks
run both before the first step and after it; rank 0 prints ``<check>: ok``.
"""

from __future__ import annotations

import sys

import torch
from mpi4py import MPI
from runtime_models import build_model, make_batch, run_checks

import rannc_py

comm = MPI.COMM_WORLD
rank = comm.Get_rank()
LAST = "transformer.h.1.mlp.c_proj.weight"  # on the last stage only (checked below)
FIRST = "transformer.wpe.weight"  # on the first stage only


def wrapped_after_step() -> tuple[rannc_py.RaNNCModule, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = build_model("gpt")
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    wrapped = rannc_py.RaNNCModule(model, None, plan={"stages": 2, "microbatches": 2}, timeout=60)
    wrapped(**make_batch("gpt", 2, seed=0)).loss.backward()
    held = {n for n, _ in wrapped.named_parameters()}
    assert (LAST in held) == (rank == 1) and (FIRST in held) == (rank == 0), sorted(held)
    return wrapped, sd


def same_error_everywhere(call, *shows: str) -> str:
    """``call()`` raises ConfigError on every rank with one message, which shows ``shows``."""
    try:
        call()
    except rannc_py.ConfigError as e:
        message = str(e)
    else:
        raise AssertionError("no error raised")
    messages = comm.allgather(message)
    assert len(set(messages)) == 1, messages
    for s in shows:
        assert s in message, (s, message)
    return message


def bad_dicts(sd: dict[str, torch.Tensor]) -> list[tuple[str, dict[str, torch.Tensor], tuple[str, ...]]]:
    w = sd[LAST]
    broadcastable = {**sd, LAST: w[0].clone()}  # a (cols,) row would broadcast into the (rows, cols) weight
    wrong = {**sd, FIRST: torch.zeros(3, 5)}
    missing = {k: v for k, v in sd.items() if k != LAST}
    extra = {**sd, "transformer.h.9.mlp.c_proj.weight": w.clone()}
    return [("broadcastable", broadcastable, ("size mismatch", LAST, str(tuple(w.shape)))),
            ("wrong shape", wrong, ("size mismatch", FIRST, "(3, 5)")),
            ("missing", missing, ("missing key(s)", LAST)),
            ("extra", extra, ("unexpected key(s)", "transformer.h.9.mlp.c_proj.weight"))]


def check_refused_after_step() -> None:
    wrapped, sd = wrapped_after_step()
    before = {n: p.detach().clone() for n, p in wrapped.named_parameters()}
    for _, bad, shows in bad_dicts(sd):
        same_error_everywhere(lambda bad=bad: wrapped.load_state_dict(bad), *shows)
    for n, p in wrapped.named_parameters():  # nothing was copied
        assert torch.equal(p, before[n]), n
    # a state dict given on rank 0 only (the others pass {}): every rank raises rank 1's error
    msg = same_error_everywhere(lambda: wrapped.load_state_dict(sd if rank == 0 else {}), "missing key(s)")
    assert "raised on rank 1" in msg, msg


def check_refused_before_step() -> None:
    torch.manual_seed(0)
    model = build_model("gpt")
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    wrapped = rannc_py.RaNNCModule(model, None, plan={"stages": 2, "microbatches": 2})
    for _, bad, shows in bad_dicts(sd):
        same_error_everywhere(lambda bad=bad: wrapped.load_state_dict(bad), *shows)


def check_not_strict() -> None:
    wrapped, sd = wrapped_after_step()
    missing = {k: v for k, v in sd.items() if k != LAST}
    extra = {**sd, "extra.weight": torch.zeros(2)}
    assert wrapped.load_state_dict(missing, strict=False) == ([LAST], [])
    assert wrapped.load_state_dict(extra, strict=False) == ([], ["extra.weight"])
    result = wrapped.load_state_dict(sd)
    assert result.missing_keys == [] and result.unexpected_keys == []
    # wrong shapes are refused whatever strict
    same_error_everywhere(lambda: wrapped.load_state_dict({**sd, LAST: sd[LAST][0]}, strict=False),
                          "size mismatch")
    # loading really copies: perturb, reload, compare with the original values
    perturbed = {k: v + 1 for k, v in sd.items()}
    wrapped.load_state_dict(perturbed)
    full = wrapped.state_dict(rank0_only=False)  # gathered on every rank
    for k, v in perturbed.items():
        torch.testing.assert_close(full[k], v, rtol=0, atol=0)
    assert (wrapped.state_dict() == {}) == (rank != 0)


def check_calls_disagree() -> None:
    wrapped, sd = wrapped_after_step()
    call = (lambda: wrapped.load_state_dict(sd)) if rank == 0 else (lambda: wrapped.state_dict())
    same_error_everywhere(call, "different collective calls", "rank 0: load_state_dict", "rank 1: state_dict")


if __name__ == "__main__":
    run_checks(globals(), sys.argv[1:])
