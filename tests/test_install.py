"""The package as a user gets it: a wheel built with default build isolation, used from outside the checkout.

SLOW (a few minutes): the fixture copies the working tree as a fresh clone
would have it (tracked and untracked-but-not-ignored files: no compiled core,
no build folder), builds a wheel from it with ``pip wheel --no-deps`` in an
isolated build environment (the build requirements of ``pyproject.toml``
come from the package registry; nothing else needs the network), and
installs it without dependencies into a temporary target folder. The
commands then run with this environment's Python, ``PYTHONPATH`` set to that
folder alone, and a working directory outside the repository.

Where the test environment holds an editable install of rannc_py, its finder
sits after the path finder on ``sys.meta_path``, so the target folder wins;
but it would still supply any module missing from the folder (even
``rannc_py._core``), so every check asserts that *each* loaded ``rannc_py``
module came from the target folder, not only the package itself.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from mpi_launch import REPO

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

# One tiny shape per family (a few layers, small widths), each in its own config's field names.
TINY = {
    "gpt": "gpt:tiny,n_layer=3",
    "rbert": "rbert:tiny,n_layer=3",
    "gpt2": "gpt2:n_layer=3,n_embd=64,n_head=2,vocab_size=512",
    "bert": "bert:num_hidden_layers=3,hidden_size=64,num_attention_heads=2,intermediate_size=128,vocab_size=512",
    "llama": ("llama:num_hidden_layers=3,hidden_size=64,num_attention_heads=4,num_key_value_heads=2,"
              "intermediate_size=128,vocab_size=512"),
}
SHAPE = ["--seq", "64", "--batch", "8", "--cluster", "a64fx:nodes=4"]

# Prints where every imported rannc_py module was loaded from, as JSON on the last line.
WHERE = ("import json, sys; print(json.dumps({n: getattr(m, '__file__', None) for n, m in list(sys.modules.items()) "
         "if n == 'rannc_py' or n.startswith('rannc_py.')}))")


def _pip(*args: str, cwd: Path) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=1500, check=False)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def _fresh_clone(dest: Path) -> Path:
    """Copy the working tree's files that a clone would have (what git tracks or would track) to ``dest``."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                                cwd=REPO, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"needs the repository as a git checkout to copy it ({e})")
    for name in filter(None, listed.decode().split("\0")):
        src = REPO / name
        if src.is_file():  # a tracked file deleted in the working tree is listed too
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Build and install the wheel; return the clone, the install folder and a working folder outside both."""
    root = tmp_path_factory.mktemp("install")
    clone = _fresh_clone(root / "clone")
    _pip("wheel", ".", "--no-deps", "-w", str(root / "wheel"), cwd=clone)
    wheels = list((root / "wheel").glob("rannc_py-*.whl"))
    assert len(wheels) == 1, wheels
    _pip("install", "--no-deps", "--target", str(root / "site"), str(wheels[0]), cwd=root)
    (root / "elsewhere").mkdir()
    return {"clone": clone, "site": root / "site", "cwd": root / "elsewhere"}


def _run(installed: dict[str, Path], argv: list[str], cwd: Path | None = None,
         timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` with the installed package alone on ``PYTHONPATH``; fail with its output if it fails."""
    env = dict(os.environ, PYTHONPATH=str(installed["site"]), OMP_NUM_THREADS="1")
    proc = subprocess.run(argv, cwd=cwd or installed["cwd"], env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)
    assert proc.returncode == 0, f"{shlex.join(argv)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def _assert_installed_modules(installed: dict[str, Path], stdout: str) -> None:
    files = json.loads(stdout.strip().splitlines()[-1])
    assert "rannc_py" in files, files
    site = str(installed["site"].resolve())
    elsewhere = {n: f for n, f in files.items() if f is not None and not str(Path(f).resolve()).startswith(site)}
    assert not elsewhere, f"modules loaded from outside {site}: {elsewhere}"


def test_the_installed_package_is_the_one_imported(installed: dict[str, Path]) -> None:
    code = f"import rannc_py.cli, rannc_py.models.gpt, rannc_py.models.bert, rannc_py._core; {WHERE}"
    _assert_installed_modules(installed, _run(installed, [sys.executable, "-c", code]).stdout)


def _help_families(installed: dict[str, Path]) -> list[str]:
    text = _run(installed, [sys.executable, "-m", "rannc_py", "plan", "--help"]).stdout
    return re.findall(r"^  ([a-z0-9_]+):", text, flags=re.MULTILINE)


def test_help_lists_the_families_tested_here(installed: dict[str, Path]) -> None:
    assert sorted(_help_families(installed)) == sorted(TINY)


@pytest.mark.parametrize("family", sorted(TINY))
def test_every_family_plans_from_outside_the_checkout(installed: dict[str, Path], family: str) -> None:
    # `python -m rannc_py`, exactly as a user runs it (where it imports from: the first test).
    out = _run(installed, [sys.executable, "-m", "rannc_py", "plan", "--model", TINY[family], *SHAPE]).stdout
    assert out.startswith("Plan:") and "search" in out, out


def test_a_model_of_ones_own_plans_from_outside_the_checkout(installed: dict[str, Path]) -> None:
    pkg = installed["cwd"] / "mynets"
    pkg.mkdir(exist_ok=True)
    (pkg / "__init__.py").write_text("")
    # An encoder-decoder with keyword inputs and a dict output, unlike any built-in family.
    (pkg / "seq2seq.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn

        class Seq2Seq(nn.Module):
            def __init__(self):
                super().__init__()
                self.emb = nn.Embedding(100, 32)
                self.net = nn.Transformer(32, 2, num_encoder_layers=2, num_decoder_layers=2,
                                          dim_feedforward=64, dropout=0.0, batch_first=True)
                self.head = nn.Linear(32, 100)

            def forward(self, src, tgt):
                logits = self.head(self.net(self.emb(src), self.emb(tgt)))
                return {"loss": logits.logsumexp(-1).mean(), "logits": logits}

        def build():
            return Seq2Seq(), (), {"src": torch.zeros(2, 16, dtype=torch.long),
                                   "tgt": torch.zeros(2, 12, dtype=torch.long)}
    """))
    out = _run(installed, [sys.executable, "-m", "rannc_py", "plan", "--model", "mynets.seq2seq:build",
                           *SHAPE]).stdout
    assert out.startswith("Plan:"), out


def _readme_plan_command() -> list[str]:
    """The README's ``python -m rannc_py plan`` example, continuation lines joined, as argv."""
    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", readme, flags=re.DOTALL)
    block = next(b for b in blocks if "python -m rannc_py plan" in b)
    argv = shlex.split(block.replace("\\\n", " "))
    assert argv[:4] == ["python", "-m", "rannc_py", "plan"], argv
    return [sys.executable, *argv[1:]]


def test_readme_planning_example_runs_verbatim_outside_the_checkout(installed: dict[str, Path]) -> None:
    argv = _readme_plan_command()
    out = _run(installed, argv, timeout=600).stdout
    assert out.startswith("Plan:"), out
    for flag in ("--json", "--png"):  # written where the user stands
        if flag in argv:
            assert (installed["cwd"] / argv[argv.index(flag) + 1]).stat().st_size > 0


def test_gpt_example_trains_from_a_fresh_clone_against_the_installed_package(installed: dict[str, Path],
                                                                            tmp_path: Path) -> None:
    # The clone has no compiled core: importing its rannc_py instead of the installed one would fail
    # (or, beside an editable install, take modules from elsewhere; the module check catches both).
    # Run as `python examples/gpt/train.py` would be, with the script's folder first on sys.path, and
    # report the modules afterwards from the same process.
    script = installed["clone"] / "examples/gpt/train.py"
    runner = (f"import runpy, sys; sys.argv = sys.argv[1:]; sys.path[0] = {str(script.parent)!r}; "
              f"runpy.run_path(sys.argv[0], run_name='__main__'); {WHERE}")
    args = ["--size", "tiny", "--steps", "2", "--batch-size", "4", "--docs", "50", "--warmup", "1",
            "--out", str(tmp_path)]
    proc = _run(installed, [sys.executable, "-c", runner, str(script), *args], cwd=installed["clone"])
    _assert_installed_modules(installed, proc.stdout)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["ranks"] == 1 and summary["steps"] == 2
    assert summary["stages"] == [1] and "plan" in summary  # trained through RaNNCModule, not eagerly
