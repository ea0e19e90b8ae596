"""RaNNCModule: equivalence with eager PyTorch across layouts, and runtime behaviours.

Multi-rank cases run many layouts per mpiexec launch; each compares, after 5
AdamW steps, every loss and the gathered parameters with eager training on
the same microbatches (see tests/mpi_scripts/runtime_equiv.py).
"""

from __future__ import annotations

import pytest
import torch
from mpi_launch import REPO, run_mpi

import rannc_py
from rannc_py.runtime.routing import (
    chunks,
    output_routes,
    stage_routes,
    unbatched_source,
)

EQUIV = REPO / "tests/mpi_scripts/runtime_equiv.py"
FEATURES = REPO / "tests/mpi_scripts/runtime_features.py"


# ------------------------------------------------------------------ routing
def test_chunks_follow_plan_split() -> None:
    assert chunks(5, 2) == [(0, 3), (3, 5)]
    assert chunks(4, 1) == [(0, 4)]


@pytest.mark.parametrize("rows,a,b", [(4, 2, 1), (4, 1, 2), (6, 2, 3), (5, 3, 2), (8, 4, 4)])
def test_stage_routes_cover_every_row_once(rows: int, a: int, b: int) -> None:
    segs = stage_routes(rows, a, b)
    covered = sorted(r for s in segs for r in range(s.start, s.stop))
    assert covered == list(range(rows))
    src, dst = chunks(rows, a), chunks(rows, b)
    for s in segs:
        assert src[s.src][0] + s.src_offset == s.start
        assert dst[s.dst][0] + s.dst_offset == s.start
    for d in range(b):  # the unbatched sender is one of d's row partners
        assert unbatched_source(rows, a, b, d) in {s.src for s in segs if s.dst == d}


def test_output_routes_reassemble_local_batches() -> None:
    batch, m, r, world = 12, 3, 2, 3
    got = {w: [None] * (batch // world) for w in range(world)}
    rows = batch // m
    for i, seg in output_routes(batch, m, r, world):
        lo = chunks(rows, r)[seg.src][0]
        for k in range(seg.rows):
            got[seg.dst][seg.dst_offset + k] = i * rows + lo + seg.src_offset + k
    assert [x for w in range(world) for x in got[w]] == list(range(batch))


# ------------------------------------------------------------ one process
def test_single_process_matches_eager() -> None:
    import sys

    sys.path.insert(0, str(REPO / "tests/mpi_scripts"))
    from runtime_models import build_model, make_batch

    torch.manual_seed(0)
    model = build_model("gpt")
    ref = build_model("gpt")
    ref.load_state_dict(model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-6)
    ropt = torch.optim.AdamW(ref.parameters(), lr=1e-3, eps=1e-6)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
    rsched = torch.optim.lr_scheduler.StepLR(ropt, 1, gamma=0.5)
    wrapped = rannc_py.RaNNCModule(model, opt, plan={"stages": 2, "replicas": [1, 1], "microbatches": 2})
    # a 2-stage plan needs 2 ranks: one process runs one stage only
    with pytest.raises(rannc_py.ConfigError, match="replicas"):
        wrapped(**make_batch("gpt", 4, seed=0))
    wrapped = rannc_py.RaNNCModule(model, opt, plan={"stages": 1, "microbatches": 2, "schedule": "gpipe"})
    for step in range(3):
        batch = make_batch("gpt", 4, seed=step)
        loss = wrapped(**batch).loss
        loss.backward()
        want = sum(ref(**{k: v[i * 2 : i * 2 + 2] for k, v in batch.items()}).loss * 0.5 for i in range(2))
        want.backward()
        torch.testing.assert_close(loss.detach(), want.detach(), rtol=1e-5, atol=1e-6)
        opt.step(), ropt.step(), sched.step(), rsched.step()
        opt.zero_grad(), ropt.zero_grad()
    sd = wrapped.state_dict()
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(sd[k], v, rtol=1e-5, atol=1e-6)
    fresh = build_model("gpt")
    fresh.load_state_dict(sd)  # loadable into the unwrapped model


# -------------------------------------------------------------- multi-rank
# Equivalence matrix: after 5 AdamW steps, losses, clipped norms and every parameter
# and buffer equal eager training (fp32, rtol 1e-5, atol 1e-6). One mpiexec launch per
# rank count. Layout ``pP_rAxB_mM_SCHED``: P stages with replicas A, B, ..., M
# microbatches; options rc = recompute, accum = 2 calls per step, clip = clip_grad_norm_.
#   own GPT: every layout (1 rank; dp2, pp2; pp4, pp2xdp2, dp4; replicas [2,1] and [1,2])
#            with GPipe and 1F1B, with and without rc, accum, clip;
#   own BERT, HF GPT-2, HF BERT, HF Llama: pp2/1F1B+rc and a replicas layout ([2,1] or [1,2]),
#            and 1 rank;
#   residual CNN (BatchNorm): 1 rank and pp2+rc (no replicas: per-replica running statistics).
OTHERS = ("bert", "hf_gpt2", "hf_bert", "hf_llama")
MATRIX = {
    1: ["gpt:p1_r1_m2_gpipe:accum,clip", "gpt:p1_r1_m2_1f1b:rc", "cnn:p1_r1_m2_1f1b:rc"]
    + [f"{m}:p1_r1_m2_1f1b" for m in OTHERS],
    2: [
        "gpt:p1_r2_m1_gpipe",
        "gpt:p1_r2_m2_1f1b:accum,clip",
        "gpt:p2_r1x1_m2_gpipe",
        "gpt:p2_r1x1_m4_1f1b",
        "gpt:p2_r1x1_m4_1f1b:rc",
        "gpt:p2_r1x1_m2_gpipe:rc,accum,clip",
        "cnn:p2_r1x1_m2_gpipe:rc",
    ]
    + [f"{m}:p2_r1x1_m2_1f1b:rc" for m in OTHERS],
    3: [
        "gpt:p2_r2x1_m2_1f1b",
        "gpt:p2_r2x1_m2_gpipe:rc,clip",
        "gpt:p2_r1x2_m2_1f1b:accum",
        "bert:p2_r2x1_m2_1f1b:rc",
        "hf_gpt2:p2_r1x2_m2_1f1b:rc",
        "hf_bert:p2_r2x1_m2_gpipe:clip",
        "hf_llama:p2_r2x1_m2_1f1b:rc,accum",
    ],
    4: [
        "gpt:p4_r1x1x1x1_m4_1f1b",
        "gpt:p4_r1x1x1x1_m4_gpipe:rc",
        "gpt:p2_r2x2_m2_1f1b:accum,clip",
        "gpt:p1_r4_m1_gpipe:clip",
    ],
}


@pytest.mark.parametrize("ranks", sorted(MATRIX))
def test_equivalence_matrix(ranks: int) -> None:
    cases = MATRIX[ranks]
    out = run_mpi(ranks, EQUIV, *cases, timeout=600).stdout
    assert out.count(": ok") == len(cases), out


def test_features_two_ranks() -> None:
    checks = ["eval_and_state", "recompute_replays_dropout", "meta", "copy_from_rank0", "batchnorm", "overlap"]
    out = run_mpi(2, FEATURES, *checks, timeout=300).stdout
    assert out.count(": ok") == len(checks), out


def test_close_and_context_manager_two_ranks() -> None:
    """close() and ``with`` free the communicators, twice is harmless; open modules are freed at exit."""
    checks = ["close", "close_before_first_call", "open_at_exit"]
    out = run_mpi(2, REPO / "tests/mpi_scripts/runtime_close.py", *checks, timeout=300).stdout
    assert out.count(": ok") == len(checks), out
    assert out.count("freed at exit") == 2, out


def test_batchnorm_one_rank() -> None:
    out = run_mpi(1, FEATURES, "batchnorm", timeout=120).stdout
    assert "batchnorm: ok" in out, out


def test_meta_model_memory_within_plan() -> None:
    out = run_mpi(4, REPO / "tests/mpi_scripts/runtime_memory.py", timeout=300).stdout
    assert "memory: ok" in out, out


def test_planned_layouts(tmp_path) -> None:
    """In-job calibration of the local cluster; the planner's torus allreduce used at run time."""
    out = run_mpi(4, REPO / "tests/mpi_scripts/runtime_planned.py", "calibrate", "torus", timeout=300,
                  env={"RANNC_CACHE_DIR": str(tmp_path)}).stdout
    assert "calibrate: ok" in out and "torus: ok" in out, out


def test_cluster_option_resolves_presets() -> None:
    from rannc_py.runtime.autoplan import job_cluster

    c = job_cluster(rannc_py.PlanOptions(cluster="a64fx:nodes=2", memory_limit="1GiB"), 2)
    assert c.num_devices == 2 and c.device.memory == 2**30
    with pytest.raises(rannc_py.ConfigError, match="3 ranks"):
        job_cluster(rannc_py.PlanOptions(cluster="a64fx:nodes=2"), 3)


def test_failure_on_one_rank_ends_all() -> None:
    with pytest.raises(AssertionError) as info:
        run_mpi(2, REPO / "tests/mpi_scripts/runtime_fail.py", timeout=120)
    text = str(info.value)
    assert "did not finish" not in text, text  # no hang
    assert "failed during the forward call" in text and "different structure or shape" in text, text
    assert "unreachable" not in text
