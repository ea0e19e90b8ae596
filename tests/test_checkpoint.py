"""Checkpoints: the format, the load path, atomicity under SIGKILL, any layout, consolidation.

Single-process tests run in this process (one MPI rank); multi-rank tests
run tests/mpi_scripts/checkpoint_resume.py under mpiexec with timeouts: a
checkpoint written by 4 ranks as pp2 x dp2 resumes bitwise on that layout and
to fp32 tolerance on 1 rank, dp2 (loaded after the first call) and pp2; a
save killed at each named point leaves the previous checkpoint as it was.
"""

from __future__ import annotations

import filecmp
import json
import pickle
import shutil
import sys
from pathlib import Path

import pytest
import torch
from mpi_launch import REPO, run_mpi
from safetensors.torch import load_file, save_file

import rannc_py
from rannc_py.cli import main as cli_main
from rannc_py.runtime.checkpoint import KILL_ENV, MARKER, read_index, read_tensors

sys.path.insert(0, str(REPO / "tests/mpi_scripts"))
from runtime_models import build_model, make_batch

SCRIPT = REPO / "tests/mpi_scripts/checkpoint_resume.py"
ONE_STAGE = {"stages": 1, "microbatches": 2}


def trained(name: str = "gpt", steps: int = 2, wrap: bool = True) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = build_model(name)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-6)
    if wrap:
        model = rannc_py.RaNNCModule(model, opt, plan=ONE_STAGE)
    for step in range(steps):
        model(**make_batch(name, 4, seed=step)).loss.backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def fresh(name: str = "gpt") -> tuple[rannc_py.RaNNCModule, torch.optim.Optimizer]:
    torch.manual_seed(1)  # other initial values than trained(): the load must overwrite them
    model = build_model(name)
    opt = torch.optim.AdamW(model.parameters(), lr=5.0, eps=1e-6)
    return rannc_py.RaNNCModule(model, opt, plan=ONE_STAGE), opt


# ------------------------------------------------------------ one process
def test_index_records_names_slices_and_optimizer_state(tmp_path: Path) -> None:
    model, opt = trained()
    rannc_py.save_checkpoint(tmp_path / "ck", model, opt, extra={"step": 2, "note": "x"})
    index = read_index(tmp_path / "ck")
    assert index["model"]["lm_head.weight"] == "transformer.wte.weight"  # the tie, written once
    assert "lm_head.weight" not in index["tensors"]
    rec = index["tensors"]["transformer.wte.weight"]
    assert rec["dtype"] == "float32" and rec["shards"][0]["slice"] == [0, rec["shape"][0] * rec["shape"][1]]
    state = index["optimizer"]["state"]["transformer.wte.weight"]
    assert state["step"] == {"tensor": 2.0, "dtype": "float32"}  # scalar state: JSON
    assert state["exp_avg"]["shards"][0]["key"] == "optimizer/transformer.wte.weight/exp_avg"
    group = index["optimizer"]["param_groups"][0]
    assert group["lr"] == {"value": 1e-3} and "transformer.wte.weight" in group["params"]
    assert index["extra"] == {"step": 2, "note": "x"} and index["config"] is None
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == [MARKER, "index.json", "rank00000.safetensors"]


@pytest.mark.parametrize("when", ["before", "after"])
def test_wrap_load_train_resumes_bitwise(tmp_path: Path, when: str) -> None:
    model, opt = trained()
    rannc_py.save_checkpoint(tmp_path / "ck", model, opt, extra=2)
    want = []
    for step in (2, 3):
        loss = model(**make_batch("gpt", 4, seed=step)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        want.append(loss.detach())
    resumed, ropt = fresh()
    if when == "after":
        with torch.no_grad():
            resumed(**make_batch("gpt", 4, seed=9))
    assert rannc_py.load_checkpoint(tmp_path / "ck", resumed, ropt) == 2
    for step, w in zip((2, 3), want):
        loss = resumed(**make_batch("gpt", 4, seed=step)).loss
        loss.backward()
        ropt.step()
        ropt.zero_grad()
        assert torch.equal(loss.detach(), w), (step, loss, w)
    for (k, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    assert ropt.param_groups[0]["betas"] == opt.param_groups[0]["betas"]  # a tuple again


def test_plain_module_roundtrip(tmp_path: Path) -> None:
    model, opt = trained(wrap=False)
    rannc_py.save_checkpoint(tmp_path / "ck", model, opt)
    torch.manual_seed(1)
    other = build_model("gpt")
    oopt = torch.optim.AdamW(other.parameters(), lr=1.0)
    assert rannc_py.load_checkpoint(tmp_path / "ck", other, oopt) is None
    for (k, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), k
    assert other.lm_head.weight is other.transformer.wte.weight  # still tied
    assert torch.equal(oopt.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_meta_model_is_materialised_by_a_load_before_the_first_call(tmp_path: Path) -> None:
    model, _ = trained(wrap=False)
    rannc_py.save_checkpoint(tmp_path / "ck", model)
    with torch.device("meta"):
        meta = build_model("gpt")
    rannc_py.load_checkpoint(tmp_path / "ck", meta)
    assert not any(t.is_meta for t in meta.state_dict().values())
    assert meta.lm_head.weight is meta.transformer.wte.weight
    assert torch.equal(meta.transformer.wte.weight, model.transformer.wte.weight)


def test_load_path_unpickles_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, opt = trained()
    rannc_py.save_checkpoint(tmp_path / "ck", model, opt)
    resumed, ropt = fresh()

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the checkpoint load path unpickled something")

    for owner, name in ((pickle, "load"), (pickle, "loads"), (torch, "load")):
        monkeypatch.setattr(owner, name, refuse)
    rannc_py.load_checkpoint(tmp_path / "ck", resumed, ropt)
    with torch.no_grad():
        resumed(**make_batch("gpt", 4, seed=0))  # setup after the load: still no pickle
    rannc_py.load_checkpoint(tmp_path / "ck", resumed, ropt)
    rannc_py.consolidate(tmp_path / "ck", tmp_path / "out")


def test_partial_or_damaged_checkpoint_is_refused(tmp_path: Path) -> None:
    model, opt = trained(steps=1)
    ck = tmp_path / "ck"
    rannc_py.save_checkpoint(ck, model, opt)
    with pytest.raises(rannc_py.ConfigError, match="no checkpoint at"):
        rannc_py.load_checkpoint(tmp_path / "nothing", model)
    partial = tmp_path / "partial"
    shutil.copytree(ck, partial)
    (partial / MARKER).unlink()
    with pytest.raises(rannc_py.ConfigError, match=f"incomplete: its commit marker {MARKER} is missing"):
        rannc_py.load_checkpoint(partial, model, opt)
    damaged = tmp_path / "damaged"
    shutil.copytree(ck, damaged)
    data = (damaged / "rank00000.safetensors").read_bytes()
    (damaged / "rank00000.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(rannc_py.ConfigError, match=r"damaged: rank00000.safetensors was committed with \d+ bytes"):
        rannc_py.load_checkpoint(damaged, model, opt)
    rannc_py.save_checkpoint(tmp_path / "noopt", model)
    with pytest.raises(rannc_py.ConfigError, match="holds no optimizer state"):
        rannc_py.load_checkpoint(tmp_path / "noopt", model, opt)


def test_checkpoint_of_another_model_is_refused(tmp_path: Path) -> None:
    model, _ = trained(steps=1)
    rannc_py.save_checkpoint(tmp_path / "ck", model)
    with pytest.raises(rannc_py.ConfigError, match="missing .* unexpected"):
        rannc_py.load_checkpoint(tmp_path / "ck", build_model("bert"))
    from rannc_py.models.gpt import GPT, GPTConfig

    wider = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=48))
    with pytest.raises(rannc_py.ConfigError, match=r"has shape \[64, 32\], the model's is \[64, 48\]"):
        rannc_py.load_checkpoint(tmp_path / "ck", wider)
    with pytest.raises(rannc_py.ConfigError, match="JSON"):
        rannc_py.save_checkpoint(tmp_path / "bad", model, extra=object())


def test_a_new_save_replaces_the_old_and_removes_leftovers(tmp_path: Path) -> None:
    model, opt = trained(steps=1)
    ck = tmp_path / "ck"
    rannc_py.save_checkpoint(ck, model, opt, extra=1)
    (tmp_path / ".ck.partial-dead").mkdir()  # left by a killed save
    rannc_py.save_checkpoint(ck, model, opt, extra=2)
    assert read_index(ck)["extra"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_sharded_records_are_joined(tmp_path: Path) -> None:
    """A tensor split in contiguous slices over files (sharded optimizer state) reads back whole."""
    full = torch.arange(12.0).reshape(3, 4)
    save_file({"a": full.reshape(-1)[:5].clone()}, str(tmp_path / "r0.safetensors"))
    save_file({"b": full.reshape(-1)[5:].clone()}, str(tmp_path / "r1.safetensors"))
    shards = [{"file": "r1.safetensors", "key": "b", "slice": [5, 12]},
              {"file": "r0.safetensors", "key": "a", "slice": [0, 5]}]
    rec = {"shape": [3, 4], "dtype": "float32", "shards": shards}
    assert torch.equal(read_tensors(tmp_path, {"t": rec})["t"], full)
    with pytest.raises(rannc_py.ConfigError, match="cover 5 of 12"):
        read_tensors(tmp_path, {"t": {**rec, "shards": shards[1:]}})


def test_consolidate_own_gpt_loads_into_the_unwrapped_model(tmp_path: Path) -> None:
    model, opt = trained()
    rannc_py.save_checkpoint(tmp_path / "ck", model, opt)
    file = rannc_py.consolidate(tmp_path / "ck", tmp_path / "out")
    plain = build_model("gpt")
    plain.load_state_dict(load_file(str(file)))  # strict: every key, the tied one too
    for (k, a), b in zip(model.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(a, b), k


def test_consolidate_hf_gpt2_loads_with_from_pretrained(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from transformers import GPT2LMHeadModel

    model, opt = trained("hf_gpt2")
    rannc_py.save_checkpoint(tmp_path / "ck", model, opt)
    assert cli_main(["consolidate", str(tmp_path / "ck"), str(tmp_path / "hf")]) == 0
    assert "model.safetensors" in capsys.readouterr().out
    assert json.loads((tmp_path / "hf/config.json").read_text())["architectures"] == ["GPT2LMHeadModel"]
    assert "lm_head.weight" not in load_file(str(tmp_path / "hf/model.safetensors"))  # tied, as HF writes it
    loaded = GPT2LMHeadModel.from_pretrained(tmp_path / "hf")
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    want = model.state_dict()
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, want[k]), k
    assert cli_main(["consolidate", str(tmp_path / "missing"), str(tmp_path / "x")]) == 2
    assert "no checkpoint at" in capsys.readouterr().err


# ------------------------------------------------------------ many ranks
@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A checkpoint written by 4 ranks as pp2 x dp2 after 2 steps, and the uninterrupted run's steps 3-4."""
    root = tmp_path_factory.mktemp("written")
    run_mpi(4, SCRIPT, "write", str(root / "ck"), str(root / "ref"), timeout=90)
    return root / "ck", root / "ref"


@pytest.mark.parametrize(("ranks", "layout", "when", "exact"), [
    (4, "2x2", "before", "bitwise"),  # the writer's layout
    (1, "1x1", "before", ""),
    (2, "1x2", "after", ""),  # dp2, loaded after the first (no-grad) call
    (2, "2x1", "before", ""),  # pp2: another plan
])
def test_resume_on_any_layout(written: tuple[Path, Path], ranks: int, layout: str, when: str, exact: str) -> None:
    ck, ref = written
    out = run_mpi(ranks, SCRIPT, "resume", str(ck), str(ref), layout, when, *[exact] * bool(exact), timeout=90)
    assert out.stdout.count(f"resumed {layout} {when}") == ranks


@pytest.mark.parametrize(("rank", "point"), [
    (0, "before_tensors"), (1, "during_tensors"), (1, "after_tensors"), (0, "before_commit"),
    (0, "before_rename"),
])
def test_killed_save_leaves_the_previous_checkpoint(written: tuple[Path, Path], tmp_path: Path, rank: int,
                                                    point: str) -> None:
    ck, ref = written
    target = tmp_path / "ck"
    shutil.copytree(ck, target)
    env = {KILL_ENV: f"{rank}:{point}"}
    with pytest.raises(AssertionError, match="exited with") as died:
        run_mpi(2, SCRIPT, "kill", str(target), timeout=90, env=env)
    assert "signal 9" in str(died.value) and "saved without being killed" not in str(died.value)
    assert not filecmp.dircmp(ck, target).diff_files and sorted(p.name for p in target.iterdir()) == sorted(
        p.name for p in ck.iterdir())
    if point == "before_rename":  # the new one was complete but not in place: the old one resumes exactly
        out = run_mpi(4, SCRIPT, "resume", str(target), str(ref), "2x2", "before", "bitwise", timeout=90)
        assert out.stdout.count("resumed 2x2 before bitwise") == 4

