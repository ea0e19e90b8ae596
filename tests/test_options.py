"""PlanOptions: one record of every planning option, checked when it is made and passed down unchanged."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import rannc_py
from rannc_py.errors import ConfigError
from rannc_py.planner.options import PlanOptions


def test_defaults_and_normalisation() -> None:
    o = PlanOptions(memory_limit="2GiB", schedules=["gpipe"], replicas=[2, 1])
    assert o.memory_limit == 2 * 2**30 and o.schedules == ("gpipe",) and o.replicas == (2, 1)
    assert PlanOptions().memory_margin == 0.1 and PlanOptions().schedules == ("1f1b", "gpipe")
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.memory_margin = 0.2  # type: ignore[misc]


def test_unknown_option_names_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="memory_margn.*memory_margin"):
        PlanOptions.from_kwargs({"memory_margn": 0.2})


def test_from_kwargs_replaces_only_what_is_given() -> None:
    base = PlanOptions(microbatches=4, recompute=True)
    o = PlanOptions.from_kwargs({"recompute": False}, base=base)
    assert o.microbatches == 4 and o.recompute is False and base.recompute is True


@pytest.mark.parametrize("bad", [
    {"memory_margin": 1.0}, {"microbatches": 0}, {"schedules": "1f1b"}, {"schedules": ("forward_only",)},
    {"recompute": "yes"}, {"replicas": [2, 0]}, {"update_cost": -1.0},
    {"return_outputs": 1}, {"memory_limit": 0}, {"cluster": 4}, {"schedules": ("zb-v3",)},
])
def test_bad_values_fail_in_the_wrapper_constructor(bad: dict) -> None:
    # Checked at construction: no trace, no planning, no first call needed.
    model = torch.nn.Linear(4, 1)
    with pytest.raises(ConfigError):
        rannc_py.RaNNCModule(model, **bad)


def test_the_cli_defaults_are_the_records() -> None:
    import argparse

    from rannc_py import cli

    captured: dict = {}
    original = argparse.ArgumentParser.parse_args

    def spy(self, args=None, namespace=None):  # the parser main() builds, read without running a plan
        ns = original(self, args, namespace)
        captured.update(vars(ns))
        raise SystemExit(0)

    argparse.ArgumentParser.parse_args = spy  # type: ignore[method-assign]
    try:
        with pytest.raises(SystemExit):
            cli.main(["plan", "--model", "gpt:n_layer=1", "--batch", "2", "--cluster", "a64fx"])
    finally:
        argparse.ArgumentParser.parse_args = original  # type: ignore[method-assign]
    assert captured["memory_margin"] == PlanOptions().memory_margin
    assert captured["optimizer"] == PlanOptions().optimizer


def test_the_optimizer_state_is_checked_on_the_record() -> None:
    # RaNNCModule's second argument is the torch optimizer; the state kind is a planner option of rannc_py.plan.
    with pytest.raises(ConfigError, match="lamb"):
        PlanOptions(optimizer="lamb")
