"""RaNNCModule beyond the traced call: other inputs, modes, lengths, attributes (see
tests/mpi_scripts/runtime_signatures.py for the multi-rank checks)."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
import torch
from mpi_launch import REPO, run_mpi

import rannc_py
from rannc_py.graph.ir import Op
from rannc_py.runtime.signatures import difference, map_stages

SCRIPT = REPO / "tests/mpi_scripts/runtime_signatures.py"
CHECKS = ["dropout_eval", "first_call_eval_and_no_grad", "other_inputs_then_train", "dynamic_padding",
          "mismatch_is_catchable"]


@pytest.mark.parametrize("ranks", [1, 2])
@pytest.mark.parametrize("check", CHECKS)
def test_signatures(ranks: int, check: str) -> None:
    out = run_mpi(ranks, SCRIPT, check, timeout=240).stdout
    assert f"{check}: ok" in out


@pytest.mark.parametrize("check", ["dropout_eval", "first_call_eval_and_no_grad"])
def test_dropout_follows_the_mode_on_four_ranks(check: str) -> None:
    out = run_mpi(4, SCRIPT, check, timeout=420).stdout
    assert f"{check}: ok" in out


def test_difference_names_the_argument() -> None:
    t = torch.zeros(2, 3)
    first = ((), {"input_ids": t, "labels": t, "use_cache": False}, True)
    assert difference(first, ((), {"input_ids": t, "use_cache": False}, True)) == (
        "`labels` was given on the first call and is missing now")
    assert "`use_cache` was False on the first call and is True now" in difference(
        first, ((), {"input_ids": t, "labels": t, "use_cache": True}, True))
    assert "`positional argument 0` was not given" in difference(first, ((t,), {}, True))


def test_map_stages_follows_parameters_and_producers() -> None:
    def op(i: int, path: str, params: list[str], inputs: list[int]) -> Op:
        return Op(index=i, name=f"op{i}", target="t", module_path=path, params=params, input_ops=inputs)

    base = SimpleNamespace(ops=[op(0, "a", ["a.w"], []), op(1, "b", ["b.w"], [0]), op(2, "", [], [1])])
    new = SimpleNamespace(ops=[op(0, "", [], []), op(1, "a", ["a.w"], [0]), op(2, "x", [], [1]),
                               op(3, "b", ["b.w"], [2])])
    for o in new.ops:
        for j in o.input_ops:
            new.ops[j].output_ops.append(o.index)
    assert map_stages(base, [0, 1, 1], new, {}) == [0, 0, 0, 1]
    backwards = SimpleNamespace(ops=[op(0, "b", ["b.w"], []), op(1, "a", ["a.w"], [0])])
    with pytest.raises(rannc_py.ConfigError, match="a.w"):
        map_stages(base, [0, 1, 1], backwards, {})


def test_attributes_pass_through_and_save_pretrained(tmp_path) -> None:
    sys.path.insert(0, str(REPO / "tests/mpi_scripts"))
    from runtime_models import build_model, make_batch
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    model = build_model("hf_gpt2")
    wrapped = rannc_py.RaNNCModule(model, plan={"stages": 1, "microbatches": 1})
    assert wrapped.module is model and wrapped.config is model.config and wrapped.dtype == torch.float32
    with pytest.raises(AttributeError):
        wrapped.no_such_attribute  # noqa: B018
    batch = make_batch("hf_gpt2", 4, seed=0)
    wrapped.eval()
    with torch.no_grad():
        got = wrapped(batch["input_ids"], use_cache=False).logits  # first call: positional, eval, no_grad
    wrapped.save_pretrained(tmp_path)
    loaded = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch["input_ids"], use_cache=False).logits, got, rtol=0, atol=0)
