"""``python -m rannc_py plan ...``: plan a model for a cluster from the command line.

Built-in model families (traced on the meta device, nothing allocated):
``gpt`` / ``gpt2`` and ``bert`` (the project's example models) and ``llama``
(Hugging Face ``LlamaForCausalLM``). ``--model gpt:1.3b`` picks a named size,
``--model gpt2:n_layer=48,n_embd=1600,n_head=25`` overrides fields (both may be
combined: ``gpt:13b,n_layer=8``). ``--model package.module:factory`` calls
``factory()`` for any user model; it returns a module that takes token ids
(batch, seq), or a tuple ``(module, args, kwargs)`` of example inputs.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
import time
from pathlib import Path
from typing import Any

import torch

from rannc_py.errors import ConfigError, RaNNCError

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _value(text: str) -> Any:
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def _example_module(family: str) -> Any:
    path = EXAMPLES / family / "model.py"
    if not path.exists():
        raise ConfigError(f"model family {family!r} needs {path}, which is missing; "
                          "use --model package.module:factory")
    spec = importlib.util.spec_from_file_location(f"rannc_example_{family}", path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"cannot load {path} as a Python module; check that it is a .py file")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up by name
    spec.loader.exec_module(mod)
    return mod


def build_model(spec: str, seq: int) -> tuple[torch.nn.Module, tuple[Any, ...], dict[str, Any]]:
    """Model and example inputs (batch 2, on the meta device) for a ``--model`` spec.

    Raises:
        ConfigError: unknown family, malformed spec or bad field.
    """
    family, _, rest = spec.partition(":")
    size, over = None, {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        if "=" in item:
            k, _, v = item.partition("=")
            over[k.strip()] = _value(v.strip())
        elif size is None:
            size = item
        else:
            raise ConfigError(f"--model {spec!r}: give one size name at most, then key=value fields")
    ids = torch.zeros(2, seq, dtype=torch.long, device="meta")
    fam = family.lower()
    try:
        with torch.device("meta"):
            if fam in ("gpt", "gpt2"):
                mod = _example_module("gpt")
                cfg = mod.gpt_config(size or "gpt2-124m", **over)
                cfg.block_size = max(cfg.block_size, seq)
                return mod.GPT(cfg), (ids,), {"labels": ids}
            if fam == "bert":
                mod = _example_module("bert")
                cfg = mod.bert_config(size or "base", **over)
                cfg.max_position = max(cfg.max_position, seq)
                return mod.Bert(cfg), (ids, ids), {"labels": ids}
            if fam == "llama":
                from transformers import LlamaConfig, LlamaForCausalLM

                if size is not None:
                    raise ConfigError("llama takes key=value LlamaConfig fields, not a size name")
                cfg = LlamaConfig(**{"max_position_embeddings": max(seq, 2048), **over})
                return LlamaForCausalLM(cfg), (), {"input_ids": ids, "labels": ids, "use_cache": False}
    except (ValueError, TypeError) as e:
        raise ConfigError(f"--model {spec!r}: {e}") from e
    if "." in family and rest and "=" not in rest:
        module = importlib.import_module(family)
        out = getattr(module, rest)()
        if isinstance(out, tuple):
            model, args, kwargs = out
            return model, tuple(args), dict(kwargs)
        return out, (torch.zeros(2, seq, dtype=torch.long),), {}
    raise ConfigError(f"unknown model family {family!r}; use gpt, gpt2, bert, llama or package.module:factory")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m rannc_py``. Returns the exit status."""
    from rannc_py.planner.options import PlanOptions

    defaults = PlanOptions()
    parser = argparse.ArgumentParser(prog="python -m rannc_py")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plan", help="plan a model for a cluster and print the plan")
    p.add_argument("--model", required=True, help="gpt2:n_layer=48,n_embd=1600,n_head=25 | bert:large | "
                   "llama:hidden_size=4096,... | package.module:factory")
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
    from rannc_py.graph.trace import trace
    from rannc_py.planner.api import plan_graph

    try:
        if ns.seq < 1:
            raise ConfigError(f"--seq must be a positive integer, got {ns.seq}")
        options = PlanOptions(cluster=ns.cluster, optimizer=ns.optimizer, memory_margin=ns.memory_margin,
                              return_outputs=ns.return_outputs)
        model, args, kwargs = build_model(ns.model, ns.seq)
        t0 = time.perf_counter()
        graph = trace(model, args, kwargs)
        t_trace = time.perf_counter() - t0
        result = plan_graph(graph.data(), ns.batch, options)  # offline planning reads pure data only
    except RaNNCError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(result.summary())
    print(f"trace {t_trace:.2f} s, search {result.search_time:.2f} s")
    if ns.json:
        result.save(ns.json)
    if ns.png:
        from rannc_py.planner.viz import draw_plan

        draw_plan(result, ns.png, title=ns.model)
    return 0
