"""FusedAdam / FusedAdamW / FusedSGD against torch.optim over 10 steps, and
state_dict interchange with torch's optimizers in both directions."""

from __future__ import annotations

import io

import pytest
import torch

from rannc_py.errors import ConfigError
from rannc_py.optim import FusedAdam, FusedAdamW, FusedSGD, kernels

RTOL, ATOL = 1e-6, 1e-7
ISAS = kernels.available_isas()


@pytest.fixture(autouse=True)
def _restore_kernel_settings():
    isa, threads = kernels.get_isa(), kernels.get_num_threads()
    yield
    kernels.set_isa(isa)
    kernels.set_num_threads(threads)


def make_params(seed: int = 0) -> list[torch.nn.Parameter]:
    """Odd sizes, an empty tensor, and a parameter whose data starts 4 bytes into its storage."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(1 + 37 * 5, generator=g)
    return [
        torch.nn.Parameter(torch.randn(1001, generator=g)),
        torch.nn.Parameter(torch.randn(17, 3, generator=g)),
        torch.nn.Parameter(torch.randn(0, generator=g)),
        torch.nn.Parameter(base[1:].view(37, 5)),  # misaligned view
        torch.nn.Parameter(torch.randn(7, generator=g)),
    ]


def clone_params(ps):
    return [torch.nn.Parameter(p.detach().clone()) for p in ps]


def groups(ps, **second):
    # Two groups with different hyperparameters; the second takes the overrides.
    return [{"params": ps[:3]}, {"params": ps[3:], **second}]


def set_grads(step: int, *param_lists) -> None:
    g = torch.Generator().manual_seed(1000 + step)
    grads = [torch.randn(p.shape, generator=g) for p in param_lists[0]]
    for ps in param_lists:
        for i, (p, gr) in enumerate(zip(ps, grads)):
            # The last param gets no gradient on odd steps (its step count lags).
            p.grad = None if (i == len(ps) - 1 and step % 2) else gr.clone()


def run_pair(make_torch, make_fused, steps=10, schedule=True):
    ref, mine = make_params(), None
    mine = clone_params(ref)
    a, b = make_torch(ref), make_fused(mine)
    sa = (
        torch.optim.lr_scheduler.StepLR(a, step_size=3, gamma=0.5) if schedule else None
    )
    sb = (
        torch.optim.lr_scheduler.StepLR(b, step_size=3, gamma=0.5) if schedule else None
    )
    for s in range(steps):
        set_grads(s, ref, mine)
        a.step()
        b.step()
        if schedule:
            sa.step()
            sb.step()
    for p, q in zip(ref, mine):
        torch.testing.assert_close(q, p, rtol=RTOL, atol=ATOL)
    return a, b, ref, mine


ADAM_CASES = [
    {"lr": 1e-2},
    {"lr": 1e-2, "weight_decay": 0.1},
    {
        "lr": 1e-2,
        "betas": (0.3, 0.9),
        "eps": 1e-6,
        "maximize": True,
        "weight_decay": 0.05,
    },
]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("kw", ADAM_CASES)
def test_adamw_matches_torch(kw, isa):
    kernels.set_isa(isa)
    a, b, _, _ = run_pair(
        lambda ps: torch.optim.AdamW(groups(ps, lr=3e-3, weight_decay=0.2), **kw),
        lambda ps: FusedAdamW(groups(ps, lr=3e-3, weight_decay=0.2), **kw),
    )
    for p, q in zip(a.state, b.state):
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(
                b.state[q][key], a.state[p][key], rtol=RTOL, atol=ATOL
            )
        assert float(b.state[q]["step"]) == float(a.state[p]["step"])


@pytest.mark.parametrize("kw", ADAM_CASES)
def test_adam_matches_torch(kw):
    run_pair(
        lambda ps: torch.optim.Adam(groups(ps, betas=(0.8, 0.99)), **kw),
        lambda ps: FusedAdam(groups(ps, betas=(0.8, 0.99)), **kw),
    )


SGD_CASES = [
    {"lr": 0.1},
    {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01},
    {"lr": 0.1, "momentum": 0.9, "dampening": 0.2, "maximize": True},
    {"lr": 0.1, "momentum": 0.8, "nesterov": True, "weight_decay": 0.02},
]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("kw", SGD_CASES)
def test_sgd_matches_torch(kw, isa):
    kernels.set_isa(isa)
    run_pair(
        lambda ps: torch.optim.SGD(groups(ps, lr=0.05), **kw),
        lambda ps: FusedSGD(groups(ps, lr=0.05), **kw),
    )


def test_two_threads_match_torch():
    kernels.set_num_threads(2)
    ref = [torch.nn.Parameter(torch.randn(70_001))]
    mine = clone_params(ref)
    a, b = torch.optim.AdamW(ref, lr=1e-2), FusedAdamW(mine, lr=1e-2)
    for s in range(3):
        set_grads(s * 2, ref, mine)  # even steps: every param has a grad
        a.step()
        b.step()
    torch.testing.assert_close(mine[0], ref[0], rtol=RTOL, atol=ATOL)


def test_state_lives_in_flat_buffers():
    ps = make_params()
    opt = FusedAdamW(ps)
    set_grads(0, ps)
    opt.step()
    avgs = [opt.state[p]["exp_avg"] for p in ps if p.grad is not None and p.numel()]
    storage = avgs[0].untyped_storage().data_ptr()
    assert all(a.untyped_storage().data_ptr() == storage for a in avgs)
    assert all(a.shape == p.shape for a, p in zip(avgs, [p for p in ps if p.numel()]))


def _roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf)


@pytest.mark.parametrize(
    "torch_cls, fused_cls, kw",
    [
        (torch.optim.AdamW, FusedAdamW, {"lr": 1e-2, "weight_decay": 0.1}),
        (torch.optim.Adam, FusedAdam, {"lr": 1e-2}),
        (torch.optim.SGD, FusedSGD, {"lr": 0.1, "momentum": 0.9}),
    ],
)
def test_state_dict_interchanges_with_torch(torch_cls, fused_cls, kw):
    # torch -> fused: train torch 3 steps, load into fused, continue both.
    ref = make_params()
    mine = clone_params(ref)
    a = torch_cls(groups(ref, lr=0.02), **kw)
    for s in range(3):
        set_grads(s, ref)
        a.step()
    for p, q in zip(ref, mine):
        q.data.copy_(p.data)
    b = fused_cls(groups(mine, lr=0.02), **kw)
    b.load_state_dict(_roundtrip(a.state_dict()))
    # fused -> torch: a fresh torch optimizer continues from the fused state.
    ref2 = clone_params(ref)
    for s in range(3, 6):
        set_grads(s, ref, mine)
        a.step()
        b.step()
    c = torch_cls(groups(ref2, lr=0.02), **kw)
    for p, q in zip(ref2, mine):
        p.data.copy_(q.data)
    c.load_state_dict(_roundtrip(b.state_dict()))
    for s in range(6, 9):
        set_grads(s, ref, mine, ref2)
        a.step()
        b.step()
        c.step()
    for p, q, r in zip(ref, mine, ref2):
        torch.testing.assert_close(q, p, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(r, p, rtol=RTOL, atol=ATOL)
    # Loading copies the state: changing the source afterwards changes nothing here.
    sd = a.state_dict()
    b.load_state_dict(sd)
    key = "momentum_buffer" if fused_cls is FusedSGD else "exp_avg"
    kept = b.state[mine[0]][key].clone()
    sd["state"][0][key].add_(1.0)
    assert torch.equal(b.state[mine[0]][key], kept)


def test_zero_grad_and_params_without_grads():
    ps = make_params()
    opt = FusedSGD(ps, lr=0.1, momentum=0.9)
    before = [p.detach().clone() for p in ps]
    opt.step()  # no grads at all: nothing changes, no state
    assert all(torch.equal(p, b) for p, b in zip(ps, before)) and not opt.state
    set_grads(0, ps)
    opt.step()
    opt.zero_grad()
    assert all(p.grad is None for p in ps)


def test_rejects_unsupported_configurations():
    with pytest.raises(ConfigError, match="float32"):
        FusedAdamW([torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))])
    with pytest.raises(ConfigError, match="betas"):
        FusedAdam([torch.nn.Parameter(torch.zeros(3))], betas=(1.0, 0.9))
    with pytest.raises(ConfigError, match="Nesterov"):
        FusedSGD([torch.nn.Parameter(torch.zeros(3))], nesterov=True)
    p = torch.nn.Parameter(torch.zeros(3))
    amsgrad = torch.optim.Adam([p], amsgrad=True)
    with pytest.raises(ConfigError, match="amsgrad"):
        FusedAdam([torch.nn.Parameter(torch.zeros(3))]).load_state_dict(
            amsgrad.state_dict()
        )
