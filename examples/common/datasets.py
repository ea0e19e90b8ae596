"""Datasets for the examples: fixed-length chunks for causal LM, and sentence
pairs with masking for BERT pretraining. Items are dicts of tensors whose keys
are the models' ``forward`` arguments."""

from __future__ import annotations

import random

import torch
from torch import Tensor

from .tokenizer import ByteTokenizer


class CausalLMDataset:
    """Non-overlapping chunks of ``seq_len`` tokens; ``labels`` equal ``input_ids``.

    The models shift labels themselves (position t predicts token t+1), as
    Hugging Face causal-LM models do.
    """

    def __init__(self, tokens: Tensor | list[int], seq_len: int) -> None:
        tokens = torch.as_tensor(tokens, dtype=torch.long)
        if seq_len < 2:
            raise ValueError(f"seq_len must be at least 2 (got {seq_len})")
        n = tokens.numel() // seq_len
        if n == 0:
            raise ValueError(f"{tokens.numel()} tokens make no chunk of seq_len {seq_len}; use more text")
        self.chunks = tokens[: n * seq_len].view(n, seq_len)

    def __len__(self) -> int:
        return self.chunks.shape[0]

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        ids = self.chunks[i]
        return {"input_ids": ids, "labels": ids.clone()}


class BertPretrainingDataset:
    """``[CLS] A [SEP] B [SEP]`` pairs with next-sentence labels and masked tokens.

    Takes documents (lists of sentences), the sequence length, and a seed.
    Sentence A starts at a sentence of a document; in half of the examples
    (chosen at random) B starts at the next sentence boundary of the same
    document (``next_sentence_label`` 0), otherwise at a sentence of another
    document (label 1). Every example fills all ``seq_len`` positions, so no
    padding is needed, and exactly ``round(mask_prob * (seq_len - 3))`` tokens
    are chosen for prediction in every example: a mean MLM loss over any split
    of a batch into equal parts then averages to the loss of the whole batch.
    Chosen tokens become [MASK] 80% of the time, a random byte 10%, and stay
    unchanged 10%. Everything is decided at construction from ``seed``.

    Raises ``ValueError`` if the documents are too short for ``seq_len``.
    """

    def __init__(
        self, documents: list[list[str]], seq_len: int, seed: int = 0, mask_prob: float = 0.15
    ) -> None:
        if seq_len < 8:
            raise ValueError(f"seq_len must be at least 8 (got {seq_len})")
        if not 0.0 < mask_prob < 1.0:
            raise ValueError(f"mask_prob must be in (0, 1) (got {mask_prob})")
        tok = ByteTokenizer()
        rng = random.Random(seed)
        self.len_a = (seq_len - 3) // 2
        self.len_b = seq_len - 3 - self.len_a
        self.num_predictions = max(1, round(mask_prob * (seq_len - 3)))
        encoded = []  # (token ids of the whole document, start offset of each sentence)
        for doc in documents:
            ids: list[int] = []
            starts: list[int] = []
            for s in doc:
                starts.append(len(ids))
                ids.extend(tok.encode(s + " "))
            encoded.append((ids, starts))
        # Where B may start in each document: a sentence start with len_b tokens after it.
        b_starts = [[s for s in starts if s + self.len_b <= len(ids)] for ids, starts in encoded]
        others = [d for d, starts in enumerate(b_starts) if starts]
        rows = []
        for d, (ids, starts) in enumerate(encoded):
            for a in starts:
                nxt = next((s for s in starts if s >= a + self.len_a), None)
                if nxt is None or nxt + self.len_b > len(ids):
                    continue
                is_random = rng.random() < 0.5 and len(others) > 1
                if is_random:
                    od = d
                    while od == d:
                        od = rng.choice(others)
                    b_ids = encoded[od][0]
                    b = rng.choice(b_starts[od])
                else:
                    b_ids, b = ids, nxt
                rows.append(self._example(ids[a : a + self.len_a], b_ids[b : b + self.len_b], int(is_random), rng))
        if not rows:
            raise ValueError(
                f"no document is long enough for seq_len {seq_len} (each needs two sentence starts "
                f"about {seq_len // 2} bytes apart with text after them); use a smaller seq_len"
            )
        self.items = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}

    def _example(self, a: list[int], b: list[int], nsp: int, rng: random.Random) -> dict[str, Tensor]:
        tok = ByteTokenizer
        ids = [tok.CLS, *a, tok.SEP, *b, tok.SEP]
        token_type = [0] * (len(a) + 2) + [1] * (len(b) + 1)
        labels = [-100] * len(ids)
        candidates = [i for i, t in enumerate(ids) if t < tok.num_bytes]
        for pos in rng.sample(candidates, self.num_predictions):
            labels[pos] = ids[pos]
            r = rng.random()
            if r < 0.8:
                ids[pos] = tok.MASK
            elif r < 0.9:
                ids[pos] = rng.randrange(tok.num_bytes)
        return {
            "input_ids": torch.tensor(ids),
            "token_type_ids": torch.tensor(token_type),
            "attention_mask": torch.ones(len(ids), dtype=torch.long),
            "labels": torch.tensor(labels),
            "next_sentence_label": torch.tensor(nsp),
        }

    def __len__(self) -> int:
        return self.items["input_ids"].shape[0]

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {k: v[i] for k, v in self.items.items()}


def gpt_dataset(seq_len: int, num_docs: int = 2000, seed: int = 0) -> CausalLMDataset:
    """The generated corpus (``num_docs`` documents from ``seed``) as causal-LM chunks of ``seq_len``."""
    from .corpus import corpus_text

    return CausalLMDataset(ByteTokenizer().encode(corpus_text(num_docs, seed)), seq_len)


def bert_dataset(seq_len: int, num_docs: int = 2000, seed: int = 0) -> BertPretrainingDataset:
    """The generated corpus (``num_docs`` documents from ``seed``) as BERT pretraining pairs of ``seq_len``."""
    from .corpus import make_documents

    return BertPretrainingDataset(make_documents(num_docs, seed), seq_len, seed=seed)
