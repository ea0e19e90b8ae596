"""Tiny models and fixed-seed batches for the runtime's multi-rank tests.

Models: the project's own ``gpt`` and ``bert`` (examples/), Hugging Face
``hf_gpt2`` (GPT2LMHeadModel), ``hf_bert`` (BertForPreTraining) and
``hf_llama`` (LlamaForCausalLM) from tiny configs with ``use_cache=False``,
and ``cnn`` (a residual CNN with BatchNorm, from tests/models.py). Every
token of every row is labelled, so each microbatch's loss averages the same
number of tokens.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rannc_py.models.bert import Bert, bert_config
from rannc_py.models.gpt import GPT, GPTConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/models.py

VOCAB, SEQ = 64, 16
MODELS = ("gpt", "bert", "hf_gpt2", "hf_bert", "hf_llama", "cnn")


def build_model(name: str, dropout: float = 0.0) -> nn.Module:
    """A freshly initialised tiny model (uses the global torch seed)."""
    if name == "gpt":
        return GPT(GPTConfig(vocab_size=VOCAB, block_size=SEQ, n_layer=2, n_head=2, n_embd=32, dropout=dropout))
    if name == "bert":
        return Bert(bert_config("tiny", vocab_size=VOCAB, max_position=SEQ, hidden=32, intermediate=64,
                                dropout=dropout))
    if name == "hf_gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        return GPT2LMHeadModel(GPT2Config(
            vocab_size=VOCAB, n_positions=SEQ, n_embd=32, n_layer=2, n_head=2, resid_pdrop=dropout,
            embd_pdrop=dropout, attn_pdrop=dropout, use_cache=False, bos_token_id=0, eos_token_id=0,
        ))
    if name == "hf_bert":
        from transformers import BertConfig, BertForPreTraining

        return BertForPreTraining(BertConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=SEQ, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
        ))
    if name == "hf_llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        return LlamaForCausalLM(LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=2 * SEQ, use_cache=False, bos_token_id=0,
            eos_token_id=0, attention_dropout=dropout,
        ))
    if name == "cnn":
        from models import ResidualCNN

        return ResidualCNN()
    raise ValueError(f"unknown test model {name!r}; choose one of {MODELS}")


def make_batch(name: str, rows: int, seed: int) -> dict[str, Any]:
    """A global batch of ``rows`` rows, the same on every rank for the same seed."""
    g = torch.Generator().manual_seed(seed)
    if name == "cnn":
        return {"x": torch.randn(rows, 3, 8, 8, generator=g), "target": torch.randint(0, 5, (rows,), generator=g)}
    ids = torch.randint(0, VOCAB, (rows, SEQ), generator=g)
    if name in ("bert", "hf_bert"):
        return {
            "input_ids": ids,
            "token_type_ids": (torch.arange(SEQ) >= SEQ // 2).long().expand(rows, SEQ).contiguous(),
            "attention_mask": torch.ones_like(ids),
            "labels": ids,
            "next_sentence_label": torch.randint(0, 2, (rows,), generator=g),
        }
    return {"input_ids": ids, "labels": ids}


def call_kwargs(name: str) -> dict[str, Any]:
    """Constant keyword arguments the model takes besides the batch."""
    return {"use_cache": False} if name in ("hf_gpt2", "hf_llama") else {}


def local_slice(batch: dict[str, Any], rank: int, local: int) -> dict[str, Any]:
    """Rank ``rank``'s rows of a global batch (``local`` rows per rank)."""
    return {k: v[rank * local : (rank + 1) * local] for k, v in batch.items()}


def rows_slice(batch: dict[str, Any], lo: int, hi: int) -> dict[str, Any]:
    """Rows ``[lo, hi)`` of a batch."""
    return {k: v[lo:hi] for k, v in batch.items()}


def run_checks(namespace: dict[str, Any], names: list[str]) -> None:
    """Run ``namespace["check_<name>"]()`` for each name, printing ``<name>: ok`` on rank 0.

    Any failure prints its traceback and aborts every rank, so one rank's
    mismatch ends the job instead of leaving the others waiting.
    """
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    try:
        for name in names:
            namespace[f"check_{name}"]()
            if comm.Get_rank() == 0:
                print(f"{name}: ok", flush=True)
    except BaseException:  # noqa: BLE001 - any failure must abort every rank
        import traceback

        traceback.print_exc()
        sys.stderr.flush()
        comm.Abort(1)


def uneven_layout(world: int) -> dict[str, Any]:
    """Two stages, all ranks but one replicating the first (one stage on a single rank)."""
    if world == 1:
        return {"stages": 1, "replicas": [1], "microbatches": 2, "schedule": "1f1b"}
    return {"stages": 2, "replicas": [world - 1, 1], "microbatches": 2, "schedule": "1f1b"}
