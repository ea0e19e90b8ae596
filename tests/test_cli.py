"""``python -m rannc_py plan`` end to end (in process, tiny models)."""

from __future__ import annotations

import pytest

from rannc_py.cli import build_model, main
from rannc_py.errors import ConfigError
from rannc_py.planner.plan import Plan


def test_plan_command_writes_json_and_png(tmp_path, capsys):
    out, png = tmp_path / "plan.json", tmp_path / "plan.png"
    rc = main(["plan", "--model", "gpt:tiny,n_layer=3", "--seq", "32", "--batch", "16",
               "--cluster", "a64fx:nodes=4", "--json", str(out), "--png", str(png)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "Plan:" in text and "search" in text
    plan = Plan.load(out)
    assert plan.world_size == 4 and plan.batch_size == 16
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bert_family_builds():
    _, args, kwargs = build_model("bert:tiny,n_layer=1", 16)
    assert len(args) == 2 and "labels" in kwargs


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--cluster", "nowhere:nodes=2"], "unknown cluster preset"),
        (["--cluster", "a64fx:nodes=2", "--model", "mamba:tiny"], "unknown model family"),
        (["--cluster", "a64fx:nodes=2", "--batch", "0"], "batch_size must be a positive integer"),
        (["--cluster", "a64fx:nodes=2", "--model", "gpt:tiny,n_lay=2"], "unknown GPTConfig fields"),
    ],
)
def test_bad_arguments(argv, match, capsys):
    base = {"--model": "gpt:tiny", "--seq": "16", "--batch": "8"}
    for k, v in zip(argv[::2], argv[1::2]):
        base[k] = v
    flat = [x for kv in base.items() for x in kv]
    assert main(["plan", *flat]) == 2
    assert match in capsys.readouterr().err


def test_bad_model_spec():
    with pytest.raises(ConfigError, match="one size name at most"):
        build_model("gpt:tiny,small", 16)
