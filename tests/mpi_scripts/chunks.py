"""Train plans with several model chunks per rank (interleaved 1F1B, ZB-V) and compare with eager PyTorch.

Usage: chunks.py CASE [CASE ...], each CASE ``model:layout[:option,...]``, e.g.
``gpt:s4_r1x1_m4_interleaved:rc,accum,clip,eval,sd``. The layout ``s4_r2x1_m4_zb-v`` is 4 stages,
replicas 2 and 1 on the two pipeline positions, 4 microbatches, schedule zb-v; a trailing ``_c3``
sets ``chunks=3`` (interleaved). Models: runtime_models' ``gpt``, ``hf_gpt2``, ``hf_llama``, plus
``gpt6`` (the own GPT with 6 layers, for 3 chunks) and ``kw`` (a model of this file with a keyword
argument). Options as runtime_equiv's (``rc``, ``accum``, ``clip``) and

- ``rcmix``: recompute on the even stages only;
- ``eval``: between steps, an eval call with labels (the loss) and a ``torch.no_grad`` call without
  labels (logits; another signature, so new programs per stage), both compared with eager;
- ``sd``: after training, ``state_dict()`` / ``optimizer_state_dict()`` compared with eager's, other
  values loaded and read back, the trained ones loaded again, and one more step compared;
- ``meta``: the wrapped model is built on the meta device (the optimizer a factory);
- ``trace``: with ``trace=`` on, the measured timeline has every rank's actions of each stage it holds,
  and a PNG beside it.

The harness is runtime_equiv's (same seeds, same eager reference weighting each replica's chunk of a
microbatch by its rows); the last stage's replica count is that of its pipeline position.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import runtime_equiv as E
import torch
from runtime_models import SEQ, VOCAB, build_model, local_slice, make_batch, rows_slice
from torch import nn

import rannc_py
from rannc_py.models.gpt import GPT, GPTConfig
from rannc_py.runtime.routing import chunks
from rannc_py.schedule.generators import stage_ranks

rank, world = E.rank, E.world


class KeywordModel(nn.Module):
    """A small language model whose forward takes a keyword-only argument (a temperature for the logits)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 32)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(32), nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
                                    for _ in range(3))
        self.head = nn.Linear(32, VOCAB)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, *,
                temperature: float = 1.0) -> dict[str, torch.Tensor]:
        x = self.emb(input_ids)
        for block in self.blocks:
            x = x + block(x)
        logits = self.head(x) / temperature
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1))
        return out


def build(name: str) -> nn.Module:
    if name == "gpt6":
        return GPT(GPTConfig(vocab_size=VOCAB, block_size=SEQ, n_layer=6, n_head=2, n_embd=32, dropout=0.0))
    if name == "kw":
        return KeywordModel()
    return build_model(name, dropout=0.0)


def call_kwargs(name: str) -> dict[str, Any]:
    if name == "kw":
        return {"temperature": 0.5}
    return {"use_cache": False} if name in ("hf_gpt2", "hf_llama") else {}


E.call_kwargs = call_kwargs  # the harness's constant keyword arguments, with the keyword model's


def parse_layout(text: str) -> dict[str, Any]:
    """``s4_r2x1_m4_zb-v[_c2]`` -> the layout dict RaNNCModule takes."""
    parts = text.split("_")
    layout: dict[str, Any] = {"stages": int(parts[0][1:]), "replicas": [int(x) for x in parts[1][1:].split("x")],
                              "microbatches": int(parts[2][1:]), "schedule": parts[3]}
    if len(parts) > 4:
        layout["chunks"] = int(parts[4][1:])
    return layout


def reference_layout(layout: dict[str, Any]) -> dict[str, Any]:
    """What the eager reference reads: microbatches, and every stage's replicas (its position's)."""
    v = layout.get("chunks", 2)
    p = layout["stages"] // v
    positions = stage_ranks(layout["schedule"], p, v)
    return {"microbatches": layout["microbatches"], "replicas": [layout["replicas"][positions[s]]
                                                                 for s in range(layout["stages"])]}


def pair(name: str, meta: bool) -> tuple[nn.Module, Any, nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(1234)
    ref = build(name)
    if meta:
        with torch.device("meta"):
            model = build(name)
    else:
        model = build(name)
        model.load_state_dict(ref.state_dict())
    ropt = torch.optim.AdamW(ref.parameters(), lr=1e-3, weight_decay=0.01, eps=1e-6)
    factory = lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.01, eps=1e-6)
    return model, (factory if meta else factory(model.parameters())), ref, ropt


def eager_eval(ref: nn.Module, batch: dict[str, Any], const: dict[str, Any], ref_layout: dict[str, Any]) -> torch.Tensor:
    """The eval loss as the module returns it: per microbatch, each last-stage replica's chunk weighted by its rows."""
    g = next(iter(batch.values())).shape[0]
    m, r = ref_layout["microbatches"], ref_layout["replicas"][-1]
    rows = g // m
    total = torch.zeros(())
    with torch.no_grad():
        for i in range(m):
            for lo, hi in chunks(rows, r):
                total += ref(**rows_slice(batch, i * rows + lo, i * rows + hi), **const)["loss"] * ((hi - lo) / g)
    return total


def check_eval(wrapped: nn.Module, ref: nn.Module, name: str, ref_layout: dict[str, Any], case: str) -> None:
    const = call_kwargs(name)
    batch = make_batch(name, E.LOCAL * world, seed=999)
    wrapped.eval()
    ref.eval()
    out = wrapped(**local_slice(batch, rank, E.LOCAL), **const)
    torch.testing.assert_close(out["loss"], eager_eval(ref, batch, const, ref_layout), rtol=1e-5, atol=1e-6,
                               msg=lambda e: f"{case} eval loss\n{e}")
    assert out["loss"].grad_fn is None, f"{case}: an eval loss carries no gradient"
    wrapped.train()
    ref.train()
    ids = local_slice(batch, rank, E.LOCAL)["input_ids"]
    with torch.no_grad():
        got = wrapped(input_ids=ids, **const)["logits"]
        want = ref(input_ids=ids, **const)["logits"]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda e: f"{case} no_grad logits\n{e}")


def check_state_round_trip(wrapped: Any, ref: nn.Module, ropt: torch.optim.Optimizer, name: str,
                           ref_layout: dict[str, Any], case: str, opts: set[str]) -> None:
    sd = wrapped.state_dict(rank0_only=False)
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(sd[k], v, rtol=1e-5, atol=1e-6, msg=lambda e, k=k: f"{case}: {k}\n{e}")
    osd = wrapped.optimizer_state_dict(rank0_only=False)
    rosd = ropt.state_dict()
    assert sorted(osd["state"]) == sorted(rosd["state"]), f"{case}: optimizer state of other parameters"
    for i, st in rosd["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(osd["state"][i][key], st[key], rtol=1e-5, atol=1e-7,
                                       msg=lambda e, i=i, key=key: f"{case}: optimizer {i} {key}\n{e}")
    torch.manual_seed(99)
    other = build(name).state_dict()
    wrapped.load_state_dict(other)
    back = wrapped.state_dict(rank0_only=False)
    for k, v in other.items():
        assert torch.equal(back[k], v), f"{case}: {k} not loaded"
    wrapped.load_state_dict(sd)
    wrapped.load_optimizer_state_dict(osd)
    E.train_like_eager(wrapped, wrapped.optimizer, ref, ropt, name, ref_layout, case + " after reload", opts,
                       steps=1)


def check_trace(path: Path, plan: Any, case: str) -> None:
    """Every rank's track holds forwards and backwards of every stage it holds, named by stage."""
    events = json.loads(path.read_text())["traceEvents"]
    for r in range(world):
        names = [e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("tid") == r
                 and e["name"] == "thread_name"]
        held = plan.stages_of_rank(r)
        assert names == [f"rank {r} (stages {', '.join(map(str, held))})"], f"{case}: {names}"
        for kind in ("F", "W" if plan.schedule == "zb-v" else "B"):
            seen = {e["args"]["stage"] for e in events if e.get("tid") == r and e.get("cat") == kind}
            assert seen == set(held), f"{case}: rank {r} traced {kind} of stages {seen}, holds {held}"
    assert path.with_suffix(".png").stat().st_size > 0, f"{case}: no picture"


def run_case(case: str) -> None:
    name, layout_text, *rest = case.split(":")
    opts = set(rest[0].split(",")) if rest else set()
    layout = parse_layout(layout_text)
    # rcmix: recompute per stage, on the even ones (a rank then holds a recomputed and a kept stage)
    layout["recompute"] = [s % 2 == 0 for s in range(layout["stages"])] if "rcmix" in opts else "rc" in opts
    ref_layout = reference_layout(layout)
    model, opt, ref, ropt = pair(name, "meta" in opts)
    folder = Path(E.comm.bcast(tempfile.mkdtemp() if rank == 0 else None, root=0))
    traced = {"trace": str(folder / "trace.json"), "trace_steps": 2} if "trace" in opts else {}
    with rannc_py.RaNNCModule(model, opt, plan=layout, **traced) as wrapped:
        if "meta" in opts:
            _train_meta(wrapped, ref, ropt, name, ref_layout, case, opts)
        else:
            E.train_like_eager(wrapped, opt, ref, ropt, name, ref_layout, case, opts,
                               steps=2 if "eval" in opts else E.STEPS)
        if "eval" in opts:
            check_eval(wrapped, ref, name, ref_layout, case)
            E.train_like_eager(wrapped, wrapped.optimizer, ref, ropt, name, ref_layout, case + " after eval", opts,
                               steps=2)
        if "sd" in opts:
            check_state_round_trip(wrapped, ref, ropt, name, ref_layout, case, opts)
        plan = wrapped.plan
        assert plan is not None and plan.chunks == layout.get("chunks", 2), f"{case}: {plan}"
        assert len(plan.stages_of_rank(rank)) == plan.chunks, f"{case}: rank {rank} holds {plan.stages_of_rank(rank)}"
    if traced and rank == 0:
        check_trace(folder / "trace.json", plan, case)
    if rank == 0:
        print(f"case {case}: ok", flush=True)


def _train_meta(wrapped: Any, ref: nn.Module, ropt: torch.optim.Optimizer, name: str, ref_layout: dict[str, Any],
                case: str, opts: set[str]) -> None:
    """A model built on meta: a first (eval) call materialises each rank's tensors, eager's values are
    loaded, then both train alike (the optimizer is the factory's, made at the first call)."""
    const = call_kwargs(name)
    batch = make_batch(name, E.LOCAL * world, seed=5)
    with torch.no_grad():
        wrapped.eval()
        wrapped(**local_slice(batch, rank, E.LOCAL), **const)  # sets the layout up
        wrapped.train()
    wrapped.load_state_dict(ref.state_dict())
    opt = wrapped.optimizer
    assert opt is not None
    E.train_like_eager(wrapped, opt, ref, ropt, name, ref_layout, case, opts)

if __name__ == "__main__":
    E.run_cases(run_case, sys.argv[1:])
