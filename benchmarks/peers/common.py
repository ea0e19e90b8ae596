"""Shared pieces of the runtime benchmark's workers: the model, the batches, the stage split, timing.

Every configuration trains the same GPT (``rannc_py.models.gpt``) from the
same seed on the same global batches, so their step times are comparable.
The language-model head is untied from the token embedding here: the two
pipeline peers would need hand-written gradient sync for a weight shared by
both stages, and rannc_py handles either; untying keeps all of them on the
same arithmetic.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rannc_py.models.gpt import GPT, GPTConfig

SEQ = 128
# GPT-2's vocabulary (the default): its LM head is a large share of the model's work, as in real GPTs.
VOCAB = 50257


def gpt_config(layers: int, hidden: int, vocab: int = VOCAB) -> GPTConfig:
    """The benchmark's GPT shape: ``layers`` blocks of ``hidden`` width, seq 128, ``vocab`` tokens, no dropout."""
    return GPTConfig(vocab_size=vocab, block_size=SEQ, n_layer=layers, n_head=8, n_embd=hidden,
                     dropout=0.0, tie_weights=False)


def build_gpt(layers: int, hidden: int, vocab: int = VOCAB) -> GPT:
    """The GPT with weights drawn from seed 0 (identical in every process)."""
    torch.manual_seed(0)
    return GPT(gpt_config(layers, hidden, vocab))


def global_batch(rows: int, step: int, vocab: int = VOCAB) -> tuple[Tensor, Tensor]:
    """``(input_ids, labels)`` of step ``step``'s global batch (``labels = input_ids``)."""
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(0, vocab, (rows, SEQ), generator=g)
    return ids, ids.clone()


def lm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """The GPT's own loss: next-token cross-entropy (position t predicts token t+1)."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1))


class Embed(nn.Module):
    """Token + position embedding of the GPT (its first layer in a hand split)."""

    def __init__(self, gpt: GPT) -> None:
        super().__init__()
        self.wte, self.wpe, self.drop = gpt.transformer.wte, gpt.transformer.wpe, gpt.transformer.drop

    def forward(self, ids: Tensor) -> Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)
        return self.drop(self.wte(ids) + self.wpe(pos))


class Head(nn.Module):
    """Final LayerNorm + LM head of the GPT (its last layer in a hand split)."""

    def __init__(self, gpt: GPT) -> None:
        super().__init__()
        self.ln_f, self.lm_head = gpt.transformer.ln_f, gpt.lm_head

    def forward(self, x: Tensor) -> Tensor:
        return self.lm_head(self.ln_f(x))


def gpt_layers(gpt: GPT) -> list[nn.Module]:
    """The GPT as a flat layer list ``[embed, block 0, ..., block L-1, head]`` sharing its parameters."""
    return [Embed(gpt), *gpt.transformer.h, Head(gpt)]


def hand_stages(gpt: GPT, boundary: int) -> tuple[nn.Sequential, nn.Sequential]:
    """Stage 0 = embed + blocks ``[0, boundary)``; stage 1 = the other blocks + head (logits out)."""
    layers = gpt_layers(gpt)
    return nn.Sequential(*layers[: 1 + boundary]), nn.Sequential(*layers[1 + boundary:])


def chunk_stages(gpt: GPT, chunks: int) -> list[nn.Sequential]:
    """The GPT cut into ``chunks`` consecutive stages of whole layers (embed first, head last), the
    blocks shared out as evenly as possible with the extra ones in the middle chunks (the embed and
    the head make the end chunks heavier)."""
    layers = gpt_layers(gpt)
    blocks = len(layers) - 2
    if not 1 <= chunks <= blocks:
        raise SystemExit(f"cannot cut {blocks} blocks into {chunks} stages")
    base, extra = divmod(blocks, chunks)
    middle_first = sorted(range(chunks), key=lambda c: abs(c - (chunks - 1) / 2))
    sizes = [base + (c in middle_first[:extra]) for c in range(chunks)]
    out, start = [], 1
    for c, n in enumerate(sizes):
        stop = start + n + (c == chunks - 1)  # the head goes with the last chunk
        out.append(nn.Sequential(*layers[(0 if c == 0 else start):stop]))
        start = stop
    return out


def worker_parser(description: str) -> argparse.ArgumentParser:
    """An argument parser with the flags every worker takes: the GPT's shape, the batch and the timing."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=VOCAB)
    ap.add_argument("--batch", type=int, default=8, help="global batch rows; default 8")
    ap.add_argument("--microbatches", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    return ap


def median_step(step: Callable[[int], None], warmup: int, steps: int) -> tuple[float, list[float], float]:
    """Run ``step(i)`` for ``warmup + steps`` steps.

    Returns the median of the timed steps, their times, and the process's CPU
    time over them divided by their wall time (1.0 = one core busy throughout,
    e.g. a rank that spins while it waits for a message).
    """
    times = []
    for i in range(warmup):
        step(i)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for i in range(warmup, warmup + steps):
        t0 = time.perf_counter()
        step(i)
        times.append(time.perf_counter() - t0)
    busy = (time.process_time() - cpu0) / (time.perf_counter() - wall0)
    return statistics.median(times), times, busy


def emit(result: dict[str, Any]) -> None:
    """Print a worker's result as the single ``RESULT {json}`` line the driver parses."""
    print("RESULT " + json.dumps(result), flush=True)


def launch_rank() -> tuple[int, int]:
    """This process's (rank, world size) from the launcher's environment (mpiexec or torchrun)."""
    for r, w in (("PMI_RANK", "PMI_SIZE"), ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"), ("RANK", "WORLD_SIZE")):
        if r in os.environ:
            return int(os.environ[r]), int(os.environ[w])
    return 0, 1
