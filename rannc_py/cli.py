"""``python -m rannc_py plan ...``: plan a model for a cluster from the command line.

``--model FAMILY[:SIZE][,key=value...]`` names the model. Every family is
built on the ``meta`` device: nothing is allocated and nothing downloaded.

* ``gpt`` and ``rbert``: the project's own GPT and BERT
  (:mod:`rannc_py.models`); keys are ``GPTConfig`` / ``BertConfig`` fields,
  sizes those of ``GPT_SIZES`` / ``BERT_SIZES`` (``gpt:1.3b``, ``rbert:large``).
* ``gpt2``, ``bert`` and ``llama``: Hugging Face ``GPT2LMHeadModel``,
  ``BertForMaskedLM`` and ``LlamaForCausalLM`` built from their config classes
  (they need ``pip install "rannc_py[hf]"``); keys are the config's fields
  (``gpt2:n_layer=48,n_embd=1600,n_head=25``), sizes the published shapes
  (``gpt2:xl``, ``bert:large``, ``llama:13b``).
* ``package.module:factory`` (or ``module:factory``) calls ``factory()`` for any model of yours; it
  returns a module that takes token ids (batch, seq), or a tuple
  ``(module, args, kwargs)`` of example inputs.

A size and fields combine: ``gpt:13b,n_layer=8`` is the 13B widths with 8
layers. A family's sequence-length bound (``block_size``,
``n_positions``, ...) is raised to ``--seq`` when it is shorter.

``--schedules`` lists the pipeline schedules to search (default 1F1B and
GPipe; name ``interleaved`` or ``zb-v`` to let the plan hold several model
chunks per rank, ``zb-h1`` for the split backward). The plan searches tensor degrees too: the traced program's tensor splits are
found first (:func:`rannc_py.frontend.annotate`) and handed to the planner as
pure data; ``--tensor T`` pins the degree of every stage (1: none). The
printed table has the stages' tensor degree and their group collectives'
seconds per microbatch.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from rannc_py.errors import ConfigError, RaNNCError
from rannc_py.models.bert import BERT_SIZES, Bert, bert_config
from rannc_py.models.gpt import GPT, GPT_SIZES, gpt_config

Built = tuple[torch.nn.Module, tuple[Any, ...], dict[str, Any]]
"""A model and its example inputs: ``(module, args, kwargs)``."""


@dataclass(frozen=True)
class Family:
    """One ``--model`` family: what it is (for ``--help``) and how to build it.

    ``build(size, fields, seq)`` takes the size name (None for the default),
    the ``key=value`` fields and the sequence length, and returns the model
    with example inputs of batch 2 on the ``meta`` device.
    """

    about: str
    build: Callable[[str | None, dict[str, Any], int], Built]


def _ids(seq: int) -> torch.Tensor:
    return torch.zeros(2, seq, dtype=torch.long, device="meta")


OWN_DEFAULT = {"gpt": "gpt2-124m", "rbert": "base"}  # the size a spec without one gets


def _own_gpt(size: str | None, fields: dict[str, Any], seq: int) -> Built:
    cfg = gpt_config(size or OWN_DEFAULT["gpt"], **fields)
    cfg.block_size = max(cfg.block_size, seq)
    ids = _ids(seq)
    return GPT(cfg), (ids,), {"labels": ids}


def _own_bert(size: str | None, fields: dict[str, Any], seq: int) -> Built:
    cfg = bert_config(size or OWN_DEFAULT["rbert"], **fields)
    cfg.max_position = max(cfg.max_position, seq)
    ids = _ids(seq)
    return Bert(cfg), (ids, ids), {"labels": ids}


@dataclass(frozen=True)
class HFModel:
    """A Hugging Face model class, its config class and the shapes it is known by.

    ``sizes`` maps a size name to config fields (the first is the default);
    ``positions`` is the config field that bounds the sequence length;
    ``decoder`` models are called with ``use_cache=False``, which tracing needs.
    """

    model: str
    config: str
    sizes: dict[str, dict[str, Any]]
    positions: str
    decoder: bool


# The published shapes (GPT-2 as released by OpenAI; BERT as in Devlin et al. 2019;
# Llama 2 in Touvron et al. 2023), written out rather than left to the config
# classes' defaults, which a transformers release may change.
HF_MODELS = {
    "gpt2": HFModel(
        model="GPT2LMHeadModel", config="GPT2Config", positions="n_positions", decoder=True,
        sizes={"small": {"n_layer": 12, "n_embd": 768, "n_head": 12},
               "medium": {"n_layer": 24, "n_embd": 1024, "n_head": 16},
               "large": {"n_layer": 36, "n_embd": 1280, "n_head": 20},
               "xl": {"n_layer": 48, "n_embd": 1600, "n_head": 25}},
    ),
    "bert": HFModel(
        model="BertForMaskedLM", config="BertConfig", positions="max_position_embeddings", decoder=False,
        sizes={"base": {"num_hidden_layers": 12, "hidden_size": 768, "num_attention_heads": 12,
                        "intermediate_size": 3072},
               "large": {"num_hidden_layers": 24, "hidden_size": 1024, "num_attention_heads": 16,
                         "intermediate_size": 4096}},
    ),
    "llama": HFModel(
        model="LlamaForCausalLM", config="LlamaConfig", positions="max_position_embeddings", decoder=True,
        sizes={"7b": {"num_hidden_layers": 32, "hidden_size": 4096, "num_attention_heads": 32,
                      "intermediate_size": 11008},
               "13b": {"num_hidden_layers": 40, "hidden_size": 5120, "num_attention_heads": 40,
                       "intermediate_size": 13824},
               "70b": {"num_hidden_layers": 80, "hidden_size": 8192, "num_attention_heads": 64,
                       "num_key_value_heads": 8, "intermediate_size": 28672}},
    ),
}


def _hf(family: str, size: str | None, fields: dict[str, Any], seq: int) -> Built:
    hf = HF_MODELS[family]
    try:
        import transformers
    except ImportError as e:
        raise ConfigError(f"model family {family!r} is Hugging Face's {hf.model}, and transformers is not "
                          f'installed ({e}); install it with `pip install "rannc_py[hf]"`, or plan the '
                          "project's own models with gpt: or rbert:") from e
    config_cls, model_cls = getattr(transformers, hf.config), getattr(transformers, hf.model)
    if size is not None and size not in hf.sizes:
        raise ConfigError(f"unknown {family} size {size!r}; choose one of {list(hf.sizes)} or give "
                          f"{hf.config} fields as key=value")
    defaults = config_cls()
    # Config classes keep unknown keywords as attributes: check, or a typo would plan the default shape.
    unknown = sorted(k for k in fields if not hasattr(defaults, k))
    if unknown:
        raise ConfigError(f"unknown {hf.config} fields {unknown}; see transformers' {hf.config} for its fields")
    values = {**hf.sizes[size or next(iter(hf.sizes))], **fields}
    values[hf.positions] = max(values.get(hf.positions, getattr(defaults, hf.positions)), seq)
    ids = _ids(seq)
    kwargs: dict[str, Any] = {"input_ids": ids, "labels": ids}
    if hf.decoder:
        values["use_cache"] = kwargs["use_cache"] = False
    return model_cls(config_cls(**values)), (), kwargs


def _sizes(names: list[str], default: str) -> str:
    return ", ".join(f"{n} (default)" if n == default else n for n in names)


FAMILIES: dict[str, Family] = {
    "gpt": Family("the project's GPT (rannc_py.models.gpt); keys: GPTConfig fields; sizes: "
                  + _sizes(list(GPT_SIZES), OWN_DEFAULT["gpt"]), _own_gpt),
    "rbert": Family("the project's BERT (rannc_py.models.bert); keys: BertConfig fields; sizes: "
                    + _sizes(list(BERT_SIZES), OWN_DEFAULT["rbert"]), _own_bert),
    **{name: Family(f"Hugging Face {hf.model}; keys: {hf.config} fields; sizes: "
                    + _sizes(list(hf.sizes), next(iter(hf.sizes))), functools.partial(_hf, name))
       for name, hf in HF_MODELS.items()},
}


def families_help() -> str:
    """The ``--model`` families, one entry each, for ``python -m rannc_py plan --help``."""
    entries = [(f"{name}:", f.about) for name, f in FAMILIES.items()]
    factory = "any model of yours: factory() returns a module taking token ids (batch, seq), or a tuple " \
              "(module, args, kwargs)"
    entries.append(("package.module:factory", factory))
    lines = ["model families (--model FAMILY[:SIZE][,key=value...]; built on the meta device, never downloaded):"]
    for name, about in entries:
        lines += textwrap.wrap(about, 100, initial_indent=f"  {name:7s} ", subsequent_indent=" " * 10)
    return "\n".join(lines)


def _value(text: str) -> Any:
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def _size_and_fields(spec: str, rest: str) -> tuple[str | None, dict[str, Any]]:
    """Split ``SIZE,key=value,...`` into the size name (or None) and the typed fields."""
    size, fields = None, {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        if "=" in item:
            k, _, v = item.partition("=")
            fields[k.strip()] = _value(v.strip())
        elif size is None:
            size = item
        else:
            raise ConfigError(f"--model {spec!r}: give one size name at most, then key=value fields")
    return size, fields


def _user_model(spec: str, module_name: str, name: str, seq: int) -> Built:
    """Call ``module_name.name()`` for a ``package.module:factory`` (or ``module:factory``) spec."""
    if not name.isidentifier():
        raise ConfigError(f"--model {spec!r}: a model of yours is given as package.module:factory, "
                          f"and {name!r} is not a function name")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        if "." not in module_name:  # most likely a misspelt family rather than a module of the user's
            raise ConfigError(f"unknown model family {module_name!r} (and no module of that name to import); use "
                              f"one of {', '.join(FAMILIES)}, package.module:factory or module:factory "
                              "(see python -m rannc_py plan --help)") from e
        raise ConfigError(f"--model {spec!r}: cannot import {module_name!r} ({e}); run from the folder "
                          "that holds it or add that folder to PYTHONPATH") from e
    factory = getattr(module, name, None)
    if not callable(factory):
        raise ConfigError(f"--model {spec!r}: {module_name} has no function {name!r}")
    out = factory()
    if isinstance(out, tuple):
        model, args, kwargs = out
        return model, tuple(args), dict(kwargs)
    return out, (torch.zeros(2, seq, dtype=torch.long),), {}


def build_model(spec: str, seq: int) -> Built:
    """Model and example inputs (batch 2, on the meta device) for a ``--model`` spec.

    Takes the spec (see the module docstring: a family with an optional size
    and fields, or ``package.module:factory``) and the sequence length;
    returns ``(model, args, kwargs)``.

    Raises:
        ConfigError: unknown family, malformed spec or bad field, transformers
            missing for a Hugging Face family, or a factory that cannot be imported.
    """
    family, _, rest = spec.partition(":")
    fam = FAMILIES.get(family.lower())
    if fam is None and ("." in family or rest.isidentifier()):
        # package.module:factory, or a top-level module of the user's (mymodels:make)
        return _user_model(spec, family, rest, seq)
    if fam is None:
        raise ConfigError(f"unknown model family {family!r}; use one of {', '.join(FAMILIES)} "
                          "or package.module:factory (see python -m rannc_py plan --help)")
    size, fields = _size_and_fields(spec, rest)
    try:
        with torch.device("meta"):
            return fam.build(size, fields, seq)
    except RaNNCError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(f"--model {spec!r}: {e}") from e


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m rannc_py``. Returns the exit status."""
    from rannc_py.planner.options import PlanOptions

    defaults = PlanOptions()
    parser = argparse.ArgumentParser(prog="python -m rannc_py")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plan", help="plan a model for a cluster and print the plan", epilog=families_help(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="FAMILY[:SIZE][,key=value...] or package.module:factory, "
                   "e.g. gpt2:n_layer=48,n_embd=1600,n_head=25 or gpt:1.3b; the families are listed below")
    p.add_argument("--seq", type=int, default=1024, help="sequence length (default 1024)")
    p.add_argument("--batch", type=int, required=True, help="global batch size")
    p.add_argument("--cluster", required=True, help="preset string, e.g. a64fx:nodes=256")
    p.add_argument("--optimizer", default=defaults.optimizer,
                   help=f"sgd | sgd_momentum | adam | adamw (default {defaults.optimizer})")
    p.add_argument("--memory-margin", type=float, default=defaults.memory_margin,
                   help=f"free memory fraction (default {defaults.memory_margin})")
    p.add_argument("--no-return-outputs", dest="return_outputs", action="store_false",
                   help="plan for training that returns only the loss (RaNNCModule(return_outputs=False)); "
                        "by default the memory of returning logits to every rank is counted")
    p.add_argument("--tensor", type=int, default=None,
                   help="pin the tensor degree of every stage (1 turns tensor parallelism off); by default the "
                        "degrees the traced graph allows (2, 3, 4, 6, 8 where they split it) are searched")
    p.add_argument("--schedules", default=",".join(defaults.schedules),
                   help=f"comma-separated schedules the planner may pick (default {','.join(defaults.schedules)}); "
                        "the experimental ones (zb-h1, and interleaved and zb-v with several model chunks per "
                        "rank) are searched only when named, e.g. --schedules 1f1b,gpipe,interleaved,zb-v")
    p.add_argument("--json", help="write the plan as JSON here")
    p.add_argument("--png", help="draw the pipeline timeline and per-rank memory here")
    c = sub.add_parser("consolidate", help="write a checkpoint as one state dict (model.safetensors)")
    c.add_argument("checkpoint", help="a checkpoint directory written by rannc_py.save_checkpoint")
    c.add_argument("out", help="the output directory (for a Hugging Face model: loadable by from_pretrained)")
    ns = parser.parse_args(argv)
    if ns.command == "consolidate":
        from rannc_py.runtime.checkpoint import consolidate

        try:
            print(consolidate(ns.checkpoint, ns.out))
        except RaNNCError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    from rannc_py.frontend import annotate
    from rannc_py.graph.trace import trace
    from rannc_py.planner.api import plan_graph

    try:
        if ns.seq < 1:
            raise ConfigError(f"--seq must be a positive integer, got {ns.seq}")
        options = PlanOptions(cluster=ns.cluster, optimizer=ns.optimizer, memory_margin=ns.memory_margin,
                              return_outputs=ns.return_outputs, tensor=ns.tensor,
                              schedules=tuple(x.strip() for x in ns.schedules.split(",") if x.strip()))
        model, args, kwargs = build_model(ns.model, ns.seq)
        t0 = time.perf_counter()
        graph = trace(model, args, kwargs)
        t_trace = time.perf_counter() - t0
        t1 = time.perf_counter()
        tensor = annotate(graph, options.tensor)  # what splits over a tensor group: pure data
        t_split = time.perf_counter() - t1
        result = plan_graph(graph.data(), ns.batch, options, tensor=tensor)  # offline planning reads pure data only
    except RaNNCError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(result.summary())
    print(f"trace {t_trace:.2f} s, tensor splits {t_split:.2f} s, search {result.search_time:.2f} s")
    if ns.json:
        result.save(ns.json)
    if ns.png:
        from rannc_py.planner.viz import draw_plan

        draw_plan(result, ns.png, title=ns.model)
    return 0
