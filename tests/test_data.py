"""The examples' data pipeline: tokenizer, generated corpus, datasets, sharded loader."""

from __future__ import annotations

import pytest
import torch

from examples.common.corpus import corpus_text, make_documents
from examples.common.datasets import (
    BertPretrainingDataset,
    CausalLMDataset,
    bert_dataset,
    gpt_dataset,
)
from examples.common.loader import ShardedLoader
from examples.common.tokenizer import ByteTokenizer


def test_tokenizer_round_trip_and_specials() -> None:
    tok = ByteTokenizer()
    text = "the fox: 3 plus 4 is 7. café"
    ids = tok.encode(text)
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode([tok.CLS, *tok.encode("ab"), tok.MASK, tok.SEP]) == "[CLS]ab[MASK][SEP]"
    assert tok.vocab_size == 260
    with pytest.raises(ValueError, match="outside"):
        tok.decode([260])


def test_corpus_is_deterministic_small_and_varied() -> None:
    assert corpus_text(50, seed=1) == corpus_text(50, seed=1)
    assert corpus_text(50, seed=1) != corpus_text(50, seed=2)
    text = corpus_text()
    assert 100_000 < len(text.encode()) < 2_000_000
    docs = make_documents(100)
    assert all(len(d) >= 5 for d in docs)
    # The first sentence names the pet's owner; later sentences share the name.
    for d in docs[:20]:
        name = d[0].split()[0]
        assert sum(name in s for s in d[1:]) >= 2


def test_causal_lm_chunks() -> None:
    ds = CausalLMDataset(list(range(100)), seq_len=16)
    assert len(ds) == 6
    item = ds[1]
    assert item["input_ids"].tolist() == list(range(16, 32))
    assert torch.equal(item["labels"], item["input_ids"])
    with pytest.raises(ValueError, match="no chunk"):
        CausalLMDataset(list(range(10)), seq_len=16)
    assert gpt_dataset(64, num_docs=100)[0]["input_ids"].shape == (64,)


def test_bert_examples_are_well_formed() -> None:
    tok = ByteTokenizer
    seq = 64
    ds = BertPretrainingDataset(make_documents(300), seq, seed=0)
    assert len(ds) > 500
    items = ds.items
    assert items["input_ids"].shape == (len(ds), seq)
    assert (items["input_ids"][:, 0] == tok.CLS).all()
    # Exactly two [SEP]s, at fixed places; segment B after the first.
    sep = items["input_ids"] == tok.SEP
    assert sep.sum(1).eq(2).all()
    first_sep = 1 + ds.len_a
    assert sep[:, first_sep].all() and sep[:, -1].all()
    assert (items["token_type_ids"][:, : first_sep + 1] == 0).all()
    assert (items["token_type_ids"][:, first_sep + 1 :] == 1).all()
    assert (items["attention_mask"] == 1).all()
    # The same number of predictions in every example, never on special tokens.
    predicted = items["labels"] != -100
    assert predicted.sum(1).eq(round(0.15 * (seq - 3))).all()
    assert not (predicted & (items["input_ids"] >= tok.num_bytes) & (items["input_ids"] != tok.MASK)).any()
    assert (items["labels"][predicted] < tok.num_bytes).all()
    # 80/10/10: masked, replaced by another byte, or kept (the last two overlap by chance 1/256).
    inputs = items["input_ids"][predicted]
    labels = items["labels"][predicted]
    n = labels.numel()
    masked = (inputs == tok.MASK).sum().item() / n
    kept = (inputs == labels).sum().item() / n
    assert 0.77 < masked < 0.83 and 0.08 < kept < 0.12, (masked, kept)
    # About half random next sentences.
    assert 0.45 < items["next_sentence_label"].float().mean().item() < 0.55


def test_bert_next_sentence_follows_in_the_same_document() -> None:
    tok = ByteTokenizer()
    docs = make_documents(200)
    texts = [" ".join(d) + " " for d in docs]
    ds = BertPretrainingDataset(docs, 64, seed=3)
    checked = {0: 0, 1: 0}
    for i in range(200):
        item = ds[i]
        ids = item["input_ids"].clone()
        masked = item["labels"] != -100
        ids[masked] = item["labels"][masked]  # undo masking
        a = tok.decode(ids[1 : 1 + ds.len_a].tolist())
        b = tok.decode(ids[2 + ds.len_a : -1].tolist())
        label = item["next_sentence_label"].item()
        same_doc = [t for t in texts if a in t and b in t and t.index(b) >= t.index(a) + len(a)]
        if label == 0:
            assert same_doc, (a, b)
        checked[label] += 1
    assert checked[0] > 50 and checked[1] > 50


def test_bert_dataset_is_deterministic_and_rejects_long_sequences() -> None:
    a, b = bert_dataset(64, num_docs=50, seed=5), bert_dataset(64, num_docs=50, seed=5)
    c = bert_dataset(64, num_docs=50, seed=6)
    assert all(torch.equal(a.items[k], b.items[k]) for k in a.items)
    assert not torch.equal(a.items["input_ids"], c.items["input_ids"][: len(a)])
    with pytest.raises(ValueError, match="smaller seq_len"):
        BertPretrainingDataset(make_documents(20), 1024)


class Numbers:
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": torch.tensor([i, 10 * i])}


@pytest.mark.parametrize("world", [1, 2, 4])
def test_shards_concatenate_to_the_single_process_batch(world: int) -> None:
    ds = Numbers(50)
    single = list(ShardedLoader(ds, batch_size=8, seed=7))
    shards = [list(ShardedLoader(ds, batch_size=8, rank=r, world_size=world, seed=7)) for r in range(world)]
    assert len(single) == 6 and all(len(s) == 6 for s in shards)
    for step, whole in enumerate(single):
        assert whole["x"].shape == (8, 2)
        torch.testing.assert_close(torch.cat([s[step]["x"] for s in shards]), whole["x"])
    seen = torch.cat([b["x"][:, 0] for b in single])
    assert seen.unique().numel() == 48  # no sample twice in an epoch


def test_loader_epochs_seeds_and_drop_last() -> None:
    ds = Numbers(20)
    loader = ShardedLoader(ds, batch_size=4, rank=1, world_size=2, seed=0)
    e0 = [b["x"] for b in loader]
    assert all(torch.equal(x, y["x"]) for x, y in zip(e0, loader))  # reproducible
    loader.set_epoch(1)
    e1 = [b["x"] for b in loader]
    assert not all(torch.equal(x, y) for x, y in zip(e0, e1))
    ordered = list(ShardedLoader(ds, batch_size=6, shuffle=False, drop_last=False))
    assert len(ordered) == 4
    assert ordered[-1]["x"][:, 0].tolist() == [18, 19, 0, 1, 2, 3]
    with pytest.raises(ValueError, match="multiple of world_size"):
        ShardedLoader(ds, batch_size=5, world_size=2)
    with pytest.raises(ValueError, match="rank"):
        ShardedLoader(ds, batch_size=4, rank=2, world_size=2)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        ShardedLoader(ds, batch_size=32)
