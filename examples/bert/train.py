"""BERT pretraining (masked-LM + next-sentence) with rannc_py, on the generated corpus.

    python examples/bert/train.py --size tiny --steps 100
    mpiexec -n 4 python examples/bert/train.py --size small --seq-len 64 --memory-limit 15MiB
    mpiexec -n 4 python examples/bert/train.py --cluster a64fx:nodes=4 --plan plan.json --save ckpt
    mpiexec -n 4 python examples/bert/train.py --cluster a64fx:nodes=4 --plan plan.json --resume ckpt --steps 200

The same script runs on one process and under ``mpiexec``. ``--model hf``
trains Hugging Face's ``BertForPreTraining`` built from a config instead of
the project's own BERT.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

# Only examples/ goes on the path (for common/): the repository root would put the
# checkout's rannc_py (a fresh clone's has no compiled core) ahead of the installed one.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from rannc_py.models.bert import BERT_SIZES, Bert, BertConfig, bert_config

# isort: split
from common.cli import training_parser
from common.datasets import bert_dataset
from common.tokenizer import ByteTokenizer
from common.trainer import print_summary, train


def build_model(kind: str, cfg: BertConfig) -> torch.nn.Module:
    """The project's BERT (``kind="own"``) or ``BertForPreTraining`` (``"hf"``) with the shape of ``cfg``."""
    if kind == "own":
        return Bert(cfg)
    from transformers import BertConfig as HFBertConfig
    from transformers import BertForPreTraining

    hf = HFBertConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden, num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head, intermediate_size=cfg.intermediate,
        max_position_embeddings=cfg.max_position, type_vocab_size=cfg.type_vocab_size,
        hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout,
        layer_norm_eps=cfg.layer_norm_eps,
    )
    return BertForPreTraining(hf)


def run(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse ``argv`` (default: the command line), train, and return rank 0's summary ({} elsewhere)."""
    args = training_parser(__doc__.splitlines()[0], list(BERT_SIZES)).parse_args(argv)
    cfg = bert_config(args.size, n_layer=args.layers, hidden=args.hidden, n_head=args.heads,
                      intermediate=None if args.hidden is None else 4 * args.hidden,
                      max_position=args.seq_len, vocab_size=args.vocab)
    if cfg.vocab_size < ByteTokenizer.vocab_size:
        raise SystemExit(f"--vocab must be at least {ByteTokenizer.vocab_size} "
                         f"(bytes + [PAD] [CLS] [SEP] [MASK]); got {cfg.vocab_size}")
    seq_len = args.seq_len or min(cfg.max_position, 128)
    torch.manual_seed(args.seed)  # every rank builds the same initial model
    model = build_model(args.model, cfg)
    dataset = bert_dataset(seq_len, num_docs=args.docs, seed=args.seed)
    return train(args, model, dataset, "bert")


def main() -> None:
    print_summary(run())


if __name__ == "__main__":
    main()
