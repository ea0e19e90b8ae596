"""Small models for tests: a residual CNN, Hugging Face models from tiny configs,
and the project's own GPT and BERT.

Every builder returns ``(model, args, kwargs)`` with dropout disabled and a
fixed seed, so eager and staged runs are comparable exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

Case = tuple[nn.Module, tuple[Any, ...], dict[str, Any]]

VOCAB = 97
SEQ = 8
BATCH = 4


class ResBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus the identity, then ReLU."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(x + self.bn2(self.conv2(y)))


class ResidualCNN(nn.Module):
    """A tiny ResNet: stem, two residual blocks, pooled linear head; returns a dict."""

    def __init__(self, channels: int = 8, classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.blocks = nn.Sequential(ResBlock(channels), ResBlock(channels))
        self.head = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.blocks(F.relu(self.stem(x)))
        logits = self.head(h.mean(dim=(2, 3)))
        return {"loss": F.cross_entropy(logits, target), "logits": logits}


class ThreeLayerMLP(nn.Module):
    """Takes a positional tensor and returns a plain tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 16)
        self.fc2 = nn.Linear(16, 16)
        self.fc3 = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


def _ids(batch: int = BATCH, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, SEQ))


def cnn() -> Case:
    torch.manual_seed(0)
    model = ResidualCNN()
    return model, (torch.randn(BATCH, 3, 8, 8), torch.randint(0, 5, (BATCH,))), {}


def mlp() -> Case:
    torch.manual_seed(0)
    return ThreeLayerMLP(), (torch.randn(BATCH, 6),), {}


def hf_gpt2() -> Case:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=VOCAB, n_positions=16, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False, bos_token_id=0, eos_token_id=0,
    )
    ids = _ids()
    return GPT2LMHeadModel(cfg), (), {"input_ids": ids, "labels": ids, "use_cache": False}


def _bert_kwargs() -> dict[str, Any]:
    """A pretraining batch in the keyword form both BERTs take: MLM labels and NSP labels."""
    ids = _ids()
    return {
        "input_ids": ids,
        "token_type_ids": torch.zeros_like(ids),
        "attention_mask": torch.ones_like(ids),
        "labels": ids,
        "next_sentence_label": torch.randint(0, 2, (BATCH,)),
    }


def hf_bert() -> Case:
    from transformers import BertConfig, BertForPreTraining

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    kwargs = _bert_kwargs()  # inputs drawn before the weights, keeping the seeded values
    return BertForPreTraining(cfg), (), kwargs


def hf_llama() -> Case:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, use_cache=False, bos_token_id=0, eos_token_id=0,
    )
    ids = _ids()
    return LlamaForCausalLM(cfg), (), {"input_ids": ids, "labels": ids, "use_cache": False}


def gpt() -> Case:
    from rannc_py.models.gpt import GPT, gpt_config

    torch.manual_seed(0)
    cfg = gpt_config("tiny", vocab_size=VOCAB, block_size=16, n_embd=32)
    ids = _ids()
    return GPT(cfg), (), {"input_ids": ids, "labels": ids}


def bert() -> Case:
    from rannc_py.models.bert import Bert, bert_config

    torch.manual_seed(0)
    cfg = bert_config("tiny", vocab_size=VOCAB, max_position=16, hidden=32, intermediate=64)
    kwargs = _bert_kwargs()  # inputs drawn before the weights, keeping the seeded values
    return Bert(cfg), (), kwargs


CASES: dict[str, Callable[[], Case]] = {
    "cnn": cnn,
    "mlp": mlp,
    "hf_gpt2": hf_gpt2,
    "hf_bert": hf_bert,
    "hf_llama": hf_llama,
    "gpt": gpt,
    "bert": bert,
}
