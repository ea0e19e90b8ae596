"""Causal-LM training of a GPT with rannc_py, on the generated corpus.

    python examples/gpt/train.py --size tiny --steps 100
    mpiexec -n 4 python examples/gpt/train.py --size small --seq-len 64 --memory-limit 15MiB
    mpiexec -n 4 python examples/gpt/train.py --cluster a64fx:nodes=4 --plan plan.json --save ckpt
    mpiexec -n 4 python examples/gpt/train.py --cluster a64fx:nodes=4 --plan plan.json --resume ckpt --steps 200

The same script runs on one process and under ``mpiexec``; rannc_py decides
how to split the model over the ranks. ``--model hf`` trains Hugging Face's
``GPT2LMHeadModel`` built from a config instead of the project's own GPT.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

# Only examples/ goes on the path (for common/): the repository root would put the
# checkout's rannc_py (a fresh clone's has no compiled core) ahead of the installed one.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from rannc_py.models.gpt import GPT, GPT_SIZES, GPTConfig, gpt_config

# isort: split
from common.cli import training_parser
from common.datasets import gpt_dataset
from common.trainer import print_summary, train


def build_model(kind: str, cfg: GPTConfig) -> torch.nn.Module:
    """The project's GPT (``kind="own"``) or ``GPT2LMHeadModel`` (``"hf"``) with the shape of ``cfg``."""
    if kind == "own":
        return GPT(cfg)
    from transformers import GPT2Config, GPT2LMHeadModel

    hf = GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
        n_head=cfg.n_head, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
        use_cache=False,  # the cache makes the output depend on past calls; tracing needs it off
    )
    return GPT2LMHeadModel(hf)


def run(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse ``argv`` (default: the command line), train, and return rank 0's summary ({} elsewhere)."""
    args = training_parser(__doc__.splitlines()[0], list(GPT_SIZES)).parse_args(argv)
    cfg = gpt_config(args.size, n_layer=args.layers, n_embd=args.hidden, n_head=args.heads,
                     block_size=args.seq_len, vocab_size=args.vocab)
    if cfg.vocab_size < 256:
        raise SystemExit(f"--vocab must be at least 256 for the byte-level tokenizer (got {cfg.vocab_size})")
    seq_len = args.seq_len or min(cfg.block_size, 128)
    torch.manual_seed(args.seed)  # every rank builds the same initial model
    model = build_model(args.model, cfg)
    dataset = gpt_dataset(seq_len, num_docs=args.docs, seed=args.seed)
    return train(args, model, dataset, "gpt")


def main() -> None:
    print_summary(run())


if __name__ == "__main__":
    main()
