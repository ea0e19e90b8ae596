"""BERT for pretraining (masked-LM + next-sentence prediction), in plain PyTorch.

Read top to bottom: config and named sizes, embeddings, encoder layer, heads,
then the model. Traceable by ``torch.export`` (non-strict) with a dynamic
batch dimension.

Conventions (the same as Hugging Face ``BertForPreTraining``, so a training
script can feed either model the same batch):

* ``labels`` (B, T) hold the original token at masked positions and -100
  elsewhere; ``next_sentence_label`` (B,) is 0 when sentence B follows
  sentence A and 1 when B is random.
* ``attention_mask`` (B, T) is 1 for tokens to attend to, 0 for padding.
* ``forward`` returns :class:`PreTrainingOutput`, a dataclass registered with
  ``torch.export``; read it as ``out.loss`` or ``out["loss"]``.

Initialisation is BERT's: weights N(0, 0.02), biases zero, LayerNorm (1, 0).
Every module that owns parameters implements ``reset_parameters()``, so a model
built on the ``meta`` device can be materialised with :func:`rannc_py.models.materialize`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rannc_py.models import sized

INIT_STD = 0.02


@dataclass
class BertConfig:
    """Shape of a BERT. ``max_position`` is the maximum sequence length."""

    vocab_size: int = 260
    max_position: int = 64
    n_layer: int = 2
    n_head: int = 2
    hidden: int = 64
    intermediate: int = 256
    type_vocab_size: int = 2
    dropout: float = 0.0
    layer_norm_eps: float = 1e-12


# "tiny" fits the byte-level tokenizer (256 bytes + 4 special tokens); the
# others are the published shapes (and a 4.9B one, for planning).
BERT_SIZES: dict[str, BertConfig] = {
    "tiny": BertConfig(vocab_size=260, max_position=64, n_layer=2, n_head=2, hidden=64, intermediate=256),
    "small": BertConfig(vocab_size=260, max_position=128, n_layer=4, n_head=4, hidden=128, intermediate=512),
    "base": BertConfig(vocab_size=30522, max_position=512, n_layer=12, n_head=12, hidden=768, intermediate=3072),
    "large": BertConfig(vocab_size=30522, max_position=512, n_layer=24, n_head=16, hidden=1024, intermediate=4096),
    "4.9b": BertConfig(vocab_size=30522, max_position=512, n_layer=96, n_head=32, hidden=2048, intermediate=8192),
}


def bert_config(name: str, **overrides: Any) -> BertConfig:
    """Return the named size (see ``BERT_SIZES``) with ``overrides`` applied.

    Takes a size name (``"tiny"``, ``"small"``, ``"base"``, ``"large"``,
    ``"4.9b"``) and keyword overrides of any :class:`BertConfig` field whose
    value is not None. Raises ``ValueError`` for an unknown name or field.
    """
    return sized(BERT_SIZES, "BERT", name, overrides)


@dataclass
class PreTrainingOutput:
    """What :meth:`Bert.forward` returns.

    ``loss`` is MLM + NSP loss (None unless both label kinds are given),
    ``prediction_logits`` (B, T, V), ``seq_relationship_logits`` (B, 2).
    """

    loss: Tensor | None
    prediction_logits: Tensor
    seq_relationship_logits: Tensor

    def __getitem__(self, key: str) -> Tensor | None:
        return getattr(self, key)


torch.export.register_dataclass(
    PreTrainingOutput, serialized_type_name="rannc_py.models.bert.PreTrainingOutput"
)


class InitLinear(nn.Linear):
    """``nn.Linear`` with BERT initialisation: weight N(0, 0.02), bias zero."""

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=INIT_STD)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class InitEmbedding(nn.Embedding):
    """``nn.Embedding`` initialised N(0, 0.02) instead of N(0, 1)."""

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=INIT_STD)


class Embeddings(nn.Module):
    """word + position + token-type embeddings, then LayerNorm and dropout."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.word = InitEmbedding(cfg.vocab_size, cfg.hidden)
        self.position = InitEmbedding(cfg.max_position, cfg.hidden)
        self.token_type = InitEmbedding(cfg.type_vocab_size, cfg.hidden)
        self.ln = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, input_ids: Tensor, token_type_ids: Tensor) -> Tensor:
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word(input_ids) + self.position(pos) + self.token_type(token_type_ids)
        return self.drop(self.ln(x))


class SelfAttention(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        if cfg.hidden % cfg.n_head != 0:
            raise ValueError(f"hidden ({cfg.hidden}) must be divisible by n_head ({cfg.n_head})")
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout
        self.qkv = InitLinear(cfg.hidden, 3 * cfg.hidden)
        self.out = InitLinear(cfg.hidden, cfg.hidden)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0
        )
        return self.out(y.transpose(1, 2).reshape(B, T, C))


class EncoderLayer(nn.Module):
    """Post-LayerNorm transformer layer, as in the original BERT."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.attn = SelfAttention(cfg)
        self.ln_1 = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)
        self.fc_in = InitLinear(cfg.hidden, cfg.intermediate)
        self.fc_out = InitLinear(cfg.intermediate, cfg.hidden)
        self.ln_2 = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        x = self.ln_1(x + self.drop(self.attn(x, mask)))
        return self.ln_2(x + self.drop(self.fc_out(F.gelu(self.fc_in(x)))))


class MaskedLMHead(nn.Module):
    """dense + GELU + LayerNorm, then a decoder tied to the word embeddings, plus a bias."""

    def __init__(self, cfg: BertConfig, word_embeddings: nn.Embedding) -> None:
        super().__init__()
        self.dense = InitLinear(cfg.hidden, cfg.hidden)
        self.ln = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)
        self.decoder = InitLinear(cfg.hidden, cfg.vocab_size, bias=False)
        self.decoder.weight = word_embeddings.weight
        self.bias = nn.Parameter(torch.empty(cfg.vocab_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.ln(F.gelu(self.dense(x)))) + self.bias


class Bert(nn.Module):
    """BERT encoder with the masked-LM and next-sentence-prediction heads."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embeddings = Embeddings(cfg)
        self.layers = nn.ModuleList([EncoderLayer(cfg) for _ in range(cfg.n_layer)])
        self.pooler = InitLinear(cfg.hidden, cfg.hidden)
        self.mlm = MaskedLMHead(cfg, self.embeddings.word)
        self.nsp = InitLinear(cfg.hidden, 2)

    def tie_weights(self) -> None:
        """Make the MLM decoder share the word-embedding weight (again after ``to_empty()``)."""
        self.mlm.decoder.weight = self.embeddings.word.weight

    def reset_parameters(self) -> None:
        """Re-tie the decoder; the submodules re-initialise themselves (children come after)."""
        self.tie_weights()

    def num_parameters(self) -> int:
        """Number of distinct parameter elements (tied weights counted once)."""
        return sum(p.numel() for p in self.parameters())

    def forward(
        self,
        input_ids: Tensor,
        token_type_ids: Tensor,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        next_sentence_label: Tensor | None = None,
    ) -> PreTrainingOutput:
        """Takes ids, segment ids and optional mask/labels, all (B, T) except NSP labels (B,).

        Returns :class:`PreTrainingOutput`; ``loss`` is the mean MLM
        cross-entropy over positions whose label is not -100 plus the mean NSP
        cross-entropy.
        """
        T = input_ids.shape[1]
        if T > self.config.max_position:
            raise ValueError(f"sequence length {T} exceeds max_position {self.config.max_position}")
        # SDPA takes a boolean mask where True means "attend"; shape (B, 1, 1, T).
        mask = None if attention_mask is None else attention_mask[:, None, None, :].bool()
        x = self.embeddings(input_ids, token_type_ids)
        for layer in self.layers:
            x = layer(x, mask)
        prediction_logits = self.mlm(x)
        seq_relationship_logits = self.nsp(torch.tanh(self.pooler(x[:, 0])))
        loss = None
        if labels is not None and next_sentence_label is not None:
            mlm_loss = F.cross_entropy(
                prediction_logits.reshape(-1, prediction_logits.size(-1)), labels.reshape(-1), ignore_index=-100
            )
            nsp_loss = F.cross_entropy(seq_relationship_logits, next_sentence_label.reshape(-1))
            loss = mlm_loss + nsp_loss
        return PreTrainingOutput(loss, prediction_logits, seq_relationship_logits)
