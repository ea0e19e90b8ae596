"""A tensor group over MPI (runtime.tensor_group): 2 ranks train as eager PyTorch does."""

from __future__ import annotations

from mpi_launch import REPO, run_mpi

SCRIPT = REPO / "tests/mpi_scripts/tp_equiv.py"


def test_two_rank_tensor_group_trains_like_eager() -> None:
    models = ["gpt", "hf_gpt2", "hf_llama", "hf_bert", "gpt:clip", "hf_llama:clip"]
    out = run_mpi(2, SCRIPT, *models, timeout=900).stdout
    for name in models:
        assert f"{name}: ok" in out


def test_two_rank_tensor_group_draws_eager_dropout() -> None:
    """Dropout 0.1 (attention, residual, embedding): losses each step, parameters after 5 steps and
    an evaluation equal eager's, the generator in eager's state after each step."""
    models = ["gpt:drop", "hf_gpt2:drop", "hf_llama:drop", "hf_bert:drop"]
    out = run_mpi(2, SCRIPT, *models, timeout=900).stdout
    for name in models:
        assert f"{name}: ok" in out


def test_two_rank_state_dict_is_full_and_loads_full() -> None:
    """state_dict() is the unwrapped model's, whole; load_state_dict takes one (eager's after 2 steps,
    then training on equals eager; a round trip is exact; a missing key is refused)."""
    models = ["gpt:state", "hf_gpt2:state", "hf_llama:state"]
    out = run_mpi(2, SCRIPT, *models, timeout=900).stdout
    for name in models:
        assert f"{name}: ok" in out


def test_four_rank_tensor_times_data_parallel() -> None:
    """Tensor groups {0, 1} and {2, 3}, each a replica fed half of every batch, gradients of every
    shard averaged over the replicas: trains as eager on the whole batch (with clip_grad_norm_ too)."""
    models = ["gpt:dp", "gpt:dp+clip", "hf_llama:dp"]
    out = run_mpi(4, SCRIPT, *models, timeout=900).stdout
    for name in models:
        assert f"{name}: ok" in out
