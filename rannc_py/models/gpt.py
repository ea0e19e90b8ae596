"""A GPT (decoder-only transformer) for causal language modelling, in plain PyTorch.

Read top to bottom: config and named sizes, then the blocks, then the model.
The model is traceable by ``torch.export`` (non-strict) with a dynamic batch
dimension: no Python control flow depends on tensor values.

Conventions (the same as Hugging Face ``GPT2LMHeadModel``, so a training
script can feed either model the same batch):

* ``labels`` are aligned with ``input_ids`` (usually ``labels = input_ids``);
  the model shifts them internally so position t predicts token t+1.
  Label ``-100`` is ignored.
* ``forward`` returns :class:`CausalLMOutput`, a dataclass registered with
  ``torch.export`` so it survives tracing; read it as ``out.loss`` or
  ``out["loss"]``.

Initialisation is GPT-2's: weights N(0, 0.02), the residual output
projections N(0, 0.02 / sqrt(2 * n_layer)), biases zero. Every module that owns
parameters implements ``reset_parameters()``, so a model built on the ``meta``
device can be materialised with :func:`rannc_py.models.materialize` (or module by module).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rannc_py.models import sized


@dataclass
class GPTConfig:
    """Shape of a GPT. ``block_size`` is the maximum sequence length."""

    vocab_size: int = 256
    block_size: int = 64
    n_layer: int = 2
    n_head: int = 2
    n_embd: int = 64
    dropout: float = 0.0
    bias: bool = True
    tie_weights: bool = True


# Named sizes. "tiny"/"small" fit the byte-level tokenizer (vocab 256) and run
# in seconds on a laptop; the others are the published shapes, for planning.
GPT_SIZES: dict[str, GPTConfig] = {
    "tiny": GPTConfig(vocab_size=256, block_size=64, n_layer=2, n_head=2, n_embd=64),
    "small": GPTConfig(vocab_size=256, block_size=128, n_layer=6, n_head=4, n_embd=128),
    "gpt2-124m": GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768),
    "350m": GPTConfig(vocab_size=50257, block_size=1024, n_layer=24, n_head=16, n_embd=1024),
    "1.3b": GPTConfig(vocab_size=50257, block_size=2048, n_layer=24, n_head=16, n_embd=2048),
    # Fugaku-LLM 13B shape.
    "13b": GPTConfig(vocab_size=49152, block_size=2048, n_layer=40, n_head=36, n_embd=5184),
    "175b": GPTConfig(vocab_size=50257, block_size=2048, n_layer=96, n_head=96, n_embd=12288),
}


def gpt_config(name: str, **overrides: Any) -> GPTConfig:
    """Return the named size (see ``GPT_SIZES``) with ``overrides`` applied.

    Takes a size name (``"tiny"``, ``"small"``, ``"gpt2-124m"``, ``"350m"``,
    ``"1.3b"``, ``"13b"``, ``"175b"``) and keyword overrides of any
    :class:`GPTConfig` field whose value is not None. Raises ``ValueError`` for
    an unknown name or field.
    """
    return sized(GPT_SIZES, "GPT", name, overrides)


@dataclass
class CausalLMOutput:
    """What :meth:`GPT.forward` returns: ``loss`` (None without labels) and ``logits`` (B, T, V)."""

    loss: Tensor | None
    logits: Tensor

    def __getitem__(self, key: str) -> Tensor | None:
        return getattr(self, key)


torch.export.register_dataclass(CausalLMOutput, serialized_type_name="rannc_py.models.gpt.CausalLMOutput")


class InitLinear(nn.Linear):
    """``nn.Linear`` with GPT-2 initialisation: weight N(0, std), bias zero."""

    def __init__(self, in_features: int, out_features: int, bias: bool, std: float) -> None:
        self.std = std  # read by reset_parameters, which nn.Linear.__init__ calls
        super().__init__(in_features, out_features, bias=bias)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=self.std)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class InitEmbedding(nn.Embedding):
    """``nn.Embedding`` initialised N(0, std) instead of N(0, 1)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, std: float) -> None:
        self.std = std
        super().__init__(num_embeddings, embedding_dim)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=self.std)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        if cfg.n_embd % cfg.n_head != 0:
            raise ValueError(f"n_embd ({cfg.n_embd}) must be divisible by n_head ({cfg.n_head})")
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout
        self.c_attn = InitLinear(cfg.n_embd, 3 * cfg.n_embd, cfg.bias, std=0.02)
        self.c_proj = InitLinear(cfg.n_embd, cfg.n_embd, cfg.bias, std=0.02 / math.sqrt(2 * cfg.n_layer))
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, n_head, T, head_dim)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.resid_drop(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.c_fc = InitLinear(cfg.n_embd, 4 * cfg.n_embd, cfg.bias, std=0.02)
        self.c_proj = InitLinear(4 * cfg.n_embd, cfg.n_embd, cfg.bias, std=0.02 / math.sqrt(2 * cfg.n_layer))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Decoder-only transformer with a language-model head (tied to ``wte`` by default)."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.config = cfg
        self.transformer = nn.ModuleDict(
            {
                "wte": InitEmbedding(cfg.vocab_size, cfg.n_embd, std=0.02),
                "wpe": InitEmbedding(cfg.block_size, cfg.n_embd, std=0.02),
                "drop": nn.Dropout(cfg.dropout),
                "h": nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)]),
                "ln_f": nn.LayerNorm(cfg.n_embd, bias=cfg.bias),
            }
        )
        self.lm_head = InitLinear(cfg.n_embd, cfg.vocab_size, bias=False, std=0.02)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Make ``lm_head`` share ``wte``'s weight when ``config.tie_weights``.

        Needed again after ``to_empty()``, which gives each module its own copy.
        """
        if self.config.tie_weights:
            self.lm_head.weight = cast(nn.Embedding, self.transformer["wte"]).weight

    def reset_parameters(self) -> None:
        """Re-tie the head; the submodules re-initialise themselves.

        ``modules()`` visits this module before its children, so calling
        ``reset_parameters`` on every module re-ties first, then initialises.
        """
        self.tie_weights()

    def num_parameters(self) -> int:
        """Number of distinct parameter elements (tied weights counted once)."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, input_ids: Tensor, labels: Tensor | None = None) -> CausalLMOutput:
        """Takes token ids (B, T) with T <= block_size and optional labels (B, T).

        Returns :class:`CausalLMOutput`; ``loss`` is the mean next-token
        cross-entropy over labels that are not -100.
        """
        T = input_ids.shape[1]
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        pos = torch.arange(T, device=input_ids.device)
        t = self.transformer
        x = t["drop"](t["wte"](input_ids) + t["wpe"](pos))
        for block in cast(nn.ModuleList, t["h"]):
            x = block(x)
        logits = self.lm_head(t["ln_f"](x))
        loss = None
        if labels is not None:
            # position t predicts token t+1
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        return CausalLMOutput(loss=loss, logits=logits)
