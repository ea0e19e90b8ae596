"""The example GPT and BERT: forward/backward, weight tying, meta-device
construction, and torch.export equivalence with a dynamic batch dimension."""

from __future__ import annotations

import math

import pytest
import torch
from torch.export import Dim

from rannc_py.models import materialize
from rannc_py.models.bert import BERT_SIZES, Bert, bert_config
from rannc_py.models.gpt import GPT, GPT_SIZES, gpt_config


def gpt_batch(batch: int = 3, seq: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (batch, seq), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}


def bert_batch(batch: int = 3, seq: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 260, (batch, seq), generator=g)
    token_type = (torch.arange(seq) >= seq // 2).long().expand(batch, seq).clone()
    labels = torch.full_like(ids, -100)
    labels[:, 1::5] = ids[:, 1::5]
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0  # one padded sequence, so the mask path is exercised
    nsp = torch.arange(batch) % 2
    return {
        "input_ids": ids,
        "token_type_ids": token_type,
        "attention_mask": mask,
        "labels": labels,
        "next_sentence_label": nsp,
    }


def make(kind: str) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    if kind == "gpt":
        return GPT(gpt_config("tiny")), gpt_batch()
    return Bert(bert_config("tiny")), bert_batch()


@pytest.mark.parametrize("kind", ["gpt", "bert"])
def test_forward_backward_reaches_every_parameter(kind: str) -> None:
    model, batch = make(kind)
    out = model(**batch)
    assert out.loss is out["loss"]
    # Near-uniform predictions at init: loss ~ ln(vocab) (+ ln 2 for NSP).
    expected = math.log(256) if kind == "gpt" else math.log(260) + math.log(2)
    assert abs(out.loss.item() - expected) < 0.5, (out.loss.item(), expected)
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} got a zero gradient"


def test_gpt_logits_shape_and_no_labels() -> None:
    model, batch = make("gpt")
    out = model(batch["input_ids"])
    assert out.loss is None
    assert out.logits.shape == (3, 16, 256)


def test_gpt_is_causal() -> None:
    model, batch = make("gpt")
    ids = batch["input_ids"]
    changed = ids.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 256
    a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, :-1], b[:, :-1])
    assert not torch.allclose(a[:, -1], b[:, -1])


def test_gpt_loss_is_shifted_cross_entropy() -> None:
    model, batch = make("gpt")
    out = model(**batch)
    ids = batch["input_ids"]
    ref = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 256), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, ref)


@pytest.mark.parametrize("kind", ["gpt", "bert"])
def test_weights_are_tied(kind: str) -> None:
    model, batch = make(kind)
    if kind == "gpt":
        emb, head = model.transformer.wte.weight, model.lm_head.weight
    else:
        emb, head = model.embeddings.word.weight, model.mlm.decoder.weight
    assert emb is head
    names = [n for n, _ in model.named_parameters()]
    assert len(names) == len({id(p) for p in model.parameters()})
    # The shared weight's gradient carries both uses: compare against an untied copy.
    model(**batch).loss.backward()
    tied_grad = emb.grad.clone()
    model.zero_grad()
    if kind == "gpt":
        model.lm_head.weight = torch.nn.Parameter(emb.detach().clone())
        model(**batch).loss.backward()
        torch.testing.assert_close(tied_grad, emb.grad + model.lm_head.weight.grad)
    else:
        model.mlm.decoder.weight = torch.nn.Parameter(emb.detach().clone())
        model(**batch).loss.backward()
        torch.testing.assert_close(tied_grad, emb.grad + model.mlm.decoder.weight.grad)


def test_gpt_untied_option() -> None:
    model = GPT(gpt_config("tiny", tie_weights=False))
    assert model.lm_head.weight is not model.transformer.wte.weight


def test_gpt_init_is_gpt2_style() -> None:
    torch.manual_seed(0)
    model = GPT(gpt_config("small"))
    std_proj = 0.02 / math.sqrt(2 * model.config.n_layer)
    proj = torch.cat([b.mlp.c_proj.weight.flatten() for b in model.transformer.h])
    assert abs(proj.std().item() - std_proj) < 0.1 * std_proj
    assert abs(model.transformer.h[0].mlp.c_fc.weight.std().item() - 0.02) < 0.002
    assert model.transformer.h[0].mlp.c_fc.bias.abs().sum() == 0


@pytest.mark.parametrize("kind,size", [("gpt", "1.3b"), ("bert", "large")])
def test_meta_construction_allocates_nothing(kind: str, size: str) -> None:
    with torch.device("meta"):
        model = GPT(gpt_config(size)) if kind == "gpt" else Bert(bert_config(size))
    assert all(p.is_meta for p in model.parameters())
    assert all(b.is_meta for b in model.buffers())
    assert model.num_parameters() > 3e8


@pytest.mark.parametrize("kind", ["gpt", "bert"])
def test_meta_model_materialises_tied_and_trainable(kind: str) -> None:
    with torch.device("meta"):
        model = GPT(gpt_config("tiny")) if kind == "gpt" else Bert(bert_config("tiny"))
    torch.manual_seed(0)
    materialize(model)
    if kind == "gpt":
        assert model.lm_head.weight is model.transformer.wte.weight
        assert model.transformer.h[0].ln_1.weight.eq(1).all()
        emb = model.transformer.wte.weight
    else:
        assert model.mlm.decoder.weight is model.embeddings.word.weight
        assert model.mlm.bias.eq(0).all()
        emb = model.embeddings.word.weight
    assert not any(p.is_meta for p in model.parameters())
    assert abs(emb.std().item() - 0.02) < 0.002
    batch = gpt_batch() if kind == "gpt" else bert_batch()
    loss = model(**batch).loss
    assert torch.isfinite(loss)
    loss.backward()


@pytest.mark.parametrize("kind", ["gpt", "bert"])
def test_export_matches_eager_loss_and_grads(kind: str) -> None:
    model, batch = make(kind)
    dims = {k: {0: Dim("batch")} for k in batch}
    ep = torch.export.export(model, (), batch, strict=False, dynamic_shapes=dims)
    traced = ep.module()
    # A batch size other than the traced one shows the batch dim is dynamic.
    other = gpt_batch(5, seed=1) if kind == "gpt" else bert_batch(5, seed=1)
    for b in (batch, other):
        model.zero_grad()
        traced.zero_grad()
        ref = model(**b)
        got = traced(**b)
        torch.testing.assert_close(got.loss, ref.loss, rtol=1e-5, atol=1e-6)
        ref.loss.backward()
        got.loss.backward()
        ref_grads = {n: p.grad for n, p in model.named_parameters()}
        got_grads = {n: p.grad for n, p in traced.named_parameters() if p.grad is not None}
        assert set(got_grads) <= set(ref_grads) | {"lm_head.weight", "mlm.decoder.weight"}
        compared = 0
        for name, g in got_grads.items():
            if name in ref_grads:
                torch.testing.assert_close(g, ref_grads[name], rtol=1e-5, atol=1e-6, msg=name)
                compared += 1
        assert compared == len(ref_grads), (compared, len(ref_grads))


def test_named_sizes_and_overrides() -> None:
    assert set(GPT_SIZES) >= {"tiny", "small", "gpt2-124m", "350m", "1.3b", "13b", "175b"}
    assert set(BERT_SIZES) >= {"tiny", "base", "large", "4.9b"}
    fugaku = gpt_config("13b")
    assert (fugaku.n_layer, fugaku.n_embd, fugaku.n_head, fugaku.block_size, fugaku.vocab_size) == (
        40, 5184, 36, 2048, 49152,
    )
    assert gpt_config("tiny", n_layer=3, n_head=None).n_layer == 3
    assert bert_config("base", hidden=128).hidden == 128
    with pytest.raises(ValueError, match="unknown GPT size"):
        gpt_config("huge")
    with pytest.raises(ValueError, match="unknown BertConfig fields"):
        bert_config("tiny", hiden=3)
    with pytest.raises(ValueError, match="divisible"):
        GPT(gpt_config("tiny", n_head=3))
