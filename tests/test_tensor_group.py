"""A tensor group over MPI (runtime.tensor_group): 2 ranks train as eager PyTorch does."""

from __future__ import annotations

from mpi_launch import REPO, run_mpi

SCRIPT = REPO / "tests/mpi_scripts/tp_equiv.py"


def test_two_rank_tensor_group_trains_like_eager() -> None:
    models = ["gpt", "hf_gpt2", "hf_llama", "hf_bert", "gpt:clip", "hf_llama:clip"]
    out = run_mpi(2, SCRIPT, *models, timeout=900).stdout
    for name in models:
        assert f"{name}: ok" in out
