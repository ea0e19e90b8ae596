"""``python -m rannc_py plan`` end to end (in process, tiny models), and the ``--model`` families."""

from __future__ import annotations

import sys
import textwrap

import pytest

from rannc_py.cli import FAMILIES, build_model, main
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
    _, args, kwargs = build_model("rbert:tiny,n_layer=1", 16)
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


# Tiny shapes of the Hugging Face families, each given by its own config's field names.
HF_TINY = {
    "gpt2": ("gpt2:n_layer=2,n_embd=32,n_head=2,vocab_size=128", "GPT2LMHeadModel", "n_layer"),
    "bert": ("bert:num_hidden_layers=2,hidden_size=32,num_attention_heads=2,intermediate_size=64,vocab_size=128",
             "BertForMaskedLM", "num_hidden_layers"),
    # Grouped-query attention: 4 query heads share 2 key/value heads.
    "llama": (("llama:num_hidden_layers=2,hidden_size=32,num_attention_heads=4,num_key_value_heads=2,"
               "intermediate_size=64,vocab_size=128"), "LlamaForCausalLM", "num_hidden_layers"),
}


@pytest.mark.parametrize("family", sorted(HF_TINY))
def test_hf_families_are_the_hugging_face_models_built_from_their_config(family, capsys):
    spec, cls, layers = HF_TINY[family]
    model, args, kwargs = build_model(spec, 40)
    assert type(model).__name__ == cls and getattr(model.config, layers) == 2
    assert next(model.parameters()).device.type == "meta"  # built, never downloaded or allocated
    assert args == () and kwargs["input_ids"].shape == (2, 40) and "labels" in kwargs
    assert main(["plan", "--model", spec, "--seq", "16", "--batch", "8", "--cluster", "a64fx:nodes=2"]) == 0
    assert "Plan:" in capsys.readouterr().out


def test_hf_named_size_with_fields_and_a_longer_sequence():
    model, _, kwargs = build_model("gpt2:medium,n_layer=2", 2048)
    cfg = model.config
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head) == (2, 1024, 16)
    assert cfg.n_positions == 2048 and kwargs["use_cache"] is False  # raised to --seq; tracing needs no cache
    llama, _, _ = build_model("llama:70b,num_hidden_layers=1", 64)
    assert (llama.config.hidden_size, llama.config.num_key_value_heads) == (8192, 8)


@pytest.mark.parametrize(
    "spec,match",
    [
        ("gpt2:n_lay=2", "unknown GPT2Config fields \\['n_lay'\\]"),  # a config class would keep it silently
        ("bert:huge", "unknown bert size 'huge'"),
        ("rbert:tiny,hiden=8", "unknown BertConfig fields"),
        ("no_such_pkg.models:build", "cannot import 'no_such_pkg.models'"),
        ("json:loads,x=1", "unknown model family 'json'"),
    ],
)
def test_bad_family_fields_and_factories_are_config_errors(spec, match):
    with pytest.raises(ConfigError, match=match):
        build_model(spec, 16)


def test_hf_family_without_transformers_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` fail
    with pytest.raises(ConfigError, match=r'pip install "rannc_py\[hf\]"'):
        build_model("llama:num_hidden_layers=1", 16)
    build_model("gpt:tiny", 16)  # the project's own models need no transformers


def test_help_lists_every_family(capsys):
    with pytest.raises(SystemExit) as e:
        main(["plan", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for name in [*FAMILIES, "package.module:factory"]:
        assert f"  {name}" in text, name
    assert set(FAMILIES) == {"gpt", "rbert", "gpt2", "bert", "llama"}


def test_factory_of_a_model_with_keyword_inputs_and_a_dict_output(tmp_path, monkeypatch, capsys):
    (tmp_path / "zoo").mkdir()
    (tmp_path / "zoo" / "__init__.py").write_text("")
    (tmp_path / "zoo" / "tagger.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn

        class Tagger(nn.Module):
            def __init__(self):
                super().__init__()
                self.emb = nn.Embedding(50, 16)
                self.layers = nn.ModuleList(nn.Linear(16, 16) for _ in range(3))
                self.head = nn.Linear(16, 5)

            def forward(self, tokens, scale=1.0):
                x = self.emb(tokens) * scale
                for layer in self.layers:
                    x = torch.relu(layer(x))
                logits = self.head(x)
                return {"loss": logits.float().pow(2).mean(), "logits": logits}

        def build():
            ids = torch.zeros(2, 12, dtype=torch.long)
            return Tagger(), (), {"tokens": ids, "scale": 0.5}
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["plan", "--model", "zoo.tagger:build", "--batch", "8", "--cluster", "a64fx:nodes=2"]) == 0
    assert "Plan:" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="zoo.tagger has no function 'missing'"):
        build_model("zoo.tagger:missing", 16)


def test_factory_in_a_top_level_module_of_the_user(tmp_path, monkeypatch, capsys):
    (tmp_path / "mymodels.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn

        def make():
            return nn.Sequential(nn.Embedding(40, 8), nn.Linear(8, 40))
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["plan", "--model", "mymodels:make", "--seq", "16", "--batch", "8", "--cluster", "a64fx:nodes=2"]) == 0
    assert "Plan:" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="unknown model family 'gtp'"):
        build_model("gtp:small", 16)  # a misspelt family reads as a module that does not exist
