"""Composition of Experts: two-stage routing, batching by expert, the oracle acceptance test, files."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moekit.compose import (
    CategoryRouter,
    Composition,
    ExpertSpec,
    bits_per_byte,
    build_composition,
    evaluate_composition,
    score_batch,
)
from moekit.data import ByteTokenizer, load_corpus
from moekit.errors import DataError, NotOwnedError, UsageError
from moekit.models import LMConfig, MoELM
from moekit.models.generate import generate

TOK = ByteTokenizer()


def tiny_lm(seed: int) -> MoELM:
    """A dense moekit LM with weights large enough that greedy choices never hinge on rounding."""
    import moekit

    torch.manual_seed(seed)
    moe = moekit.MoEConfig(d_model=32, d_expert=32, num_experts=2, router=moekit.RouterConfig(kind="topk", k=1))
    cfg = LMConfig(vocab_size=TOK.vocab_size, d_model=32, n_layers=2, n_heads=4, max_seq_len=64, n_dense=2,
                   d_ff_dense=48, init_std=0.3, moe=moe)
    return MoELM(cfg).eval()


class Counted(nn.Module):
    """A model that counts its forwards and the rows it saw."""

    def __init__(self, model):
        super().__init__()
        self.model, self.cfg, self.calls = model, model.cfg, []

    def forward(self, ids_BT):
        self.calls.append(tuple(ids_BT.shape))
        return self.model(ids_BT)


class Unigram(nn.Module):
    """logits = w at every position: the score of a text is a hand-computable sum."""

    def __init__(self, favoured: bytes):
        super().__init__()
        w = torch.zeros(TOK.vocab_size)
        w[list(favoured)] = 3.0
        self.w = nn.Parameter(w)

    def forward(self, ids_BT):
        return self.w.expand(*ids_BT.shape, -1)


def _router(categories, texts, labels):
    router = CategoryRouter(categories, num_features=512)
    router.fit(texts, labels, steps=100)
    return router


TEXTS = ["hello there, how are you", "def f(x):\n    return x", "guten Tag, wie geht es", "import os\nprint(1)",
         "good morning friends", "class A:\n    pass"]
LABELS = ["prose", "code", "prose", "code", "prose", "code"]


@pytest.fixture
def comp():
    models = {"m1": (Counted(tiny_lm(1)), TOK), "m2": (Counted(tiny_lm(2)), TOK)}
    experts = [ExpertSpec("m1", "unused"), ExpertSpec("m2", "unused")]
    return Composition(experts, _router(["prose", "code"], TEXTS, LABELS), {"prose": "m1", "code": "m2"},
                       models=models)


def test_oracle_composition_equals_the_chosen_model(comp):
    """Acceptance: with oracle routing, each request's result is the chosen model's own output on it."""
    routes = comp.oracle(LABELS)
    scores = comp.score(TEXTS, routes, seq_len=32)
    for text, label, (nll, nbytes, ntok) in zip(TEXTS, LABELS, scores, strict=True):
        model = comp.model(comp.mapping[label])[0].model
        ids = torch.tensor([TOK.encode(text)])
        direct = F.cross_entropy(model(ids[:, :-1])[0], ids[0, 1:], reduction="sum").item()
        assert nll == pytest.approx(direct, rel=1e-5) and (nbytes, ntok) == (len(text.encode()) - 1, ids.shape[1] - 1)
    outputs = comp.generate(TEXTS, routes, max_new_tokens=8)
    for text, label, out in zip(TEXTS, LABELS, outputs, strict=True):
        model = comp.model(comp.mapping[label])[0].model
        ids = generate(model, torch.tensor([TOK.encode(text)]), 8, eos_id=TOK.eos_id)[0, len(text.encode()):]
        assert out == TOK.decode([t for t in ids.tolist() if t != TOK.eos_id])


def test_each_expert_runs_once_per_batch(comp):
    routes = comp.route(TEXTS)
    assert [r.expert for r in routes] == ["m1" if label == "prose" else "m2" for label in LABELS]
    comp.score(TEXTS, routes, seq_len=8)  # several windows per request, still one forward per expert
    for name in ("m1", "m2"):
        calls = comp.model(name)[0].calls
        assert len(calls) == 1 and calls[0][0] > 3
        calls.clear()
    comp.generate(TEXTS, routes, max_new_tokens=5)
    for name in ("m1", "m2"):
        calls = comp.model(name)[0].calls
        assert len(calls) <= 5 and all(batch == 3 for batch, _ in calls)  # 3 requests each, one forward a step


def test_windows_score_every_token_but_the_first_once():
    model = Unigram(b"ab")
    text = "abcabcabca"  # 10 bytes: 9 predictions in windows of 4 + 1
    (nll, nbytes, ntok), = score_batch(model, TOK, [text], seq_len=4)
    logp = torch.log_softmax(model.w, -1)
    assert nll == pytest.approx(-sum(float(logp[b].detach()) for b in text.encode()[1:]), rel=1e-6)
    assert (nbytes, ntok) == (9, 9)


def test_mapping_picks_each_categorys_best_expert():
    """Unigram experts: "letters" favours letters, space and comma; "symbols" favours letters, space and code
    symbols (so it spreads more mass): each category maps to its own expert, by bits per byte."""
    lower = b"abcdefghijklmnopqrstuvwxyz "
    models = {"letters": (Unigram(lower + b","), TOK), "symbols": (Unigram(lower + b"():=\n_.'1"), TOK),
              "flat": (Unigram(b""), TOK)}
    experts = [ExpertSpec(n, "unused") for n in models]
    comp = build_composition(experts, TEXTS * 2, LABELS * 2, mapping_per_category=3, router_steps=100, models=models)
    assert comp.mapping == {"prose": "letters", "code": "symbols"}
    assert min(comp.mapping_bpb["prose"], key=comp.mapping_bpb["prose"].get) == "letters"
    result = evaluate_composition(comp, TEXTS, LABELS, batch_size=4)
    assert result["router_accuracy"] == 1.0
    assert result["overall"]["routed"] == result["overall"]["oracle"] < min(result["overall"][e] for e in models)
    prose = [comp.score([t], comp.fixed("letters", 1))[0] for t, c in zip(TEXTS, LABELS, strict=True) if c == "prose"]
    assert result["per_category"]["prose"]["letters"] == pytest.approx(bits_per_byte(prose), abs=1e-4)


def test_low_confidence_goes_to_the_fallback(comp):
    comp.fallback, comp.min_confidence = "m2", 1.0  # no probability reaches 1: everything falls back
    assert {r.expert for r in comp.route(TEXTS)} == {"m2"}
    with pytest.raises(UsageError, match="fallback 'nobody' is not one of the experts"):
        Composition(list(comp.experts.values()), comp.router, comp.mapping, fallback="nobody")
    with pytest.raises(UsageError, match="category 'code' maps to 'm9'"):
        Composition(list(comp.experts.values()), comp.router, {"prose": "m1", "code": "m9"})


def test_router_separates_the_corpus_domains():
    train = load_corpus("train")[::8]
    val = load_corpus("validation")
    router = CategoryRouter(sorted({s.domain for s in train}))
    router.fit([s.text for s in train], [s.domain for s in train], steps=150)
    predicted = router.predict_proba([s.text for s in val]).argmax(-1).tolist()
    accuracy = sum(router.categories[p] == s.domain for p, s in zip(predicted, val, strict=True)) / len(val)
    assert accuracy >= 0.95
    with pytest.raises(UsageError, match="label 'klingon' is not a category"):
        router.fit(["x"], ["klingon"])


def test_save_and_load(comp, tmp_path):
    comp.save(tmp_path / "c")
    back = Composition.load(tmp_path / "c")
    assert back.mapping == comp.mapping and back.categories == comp.categories
    assert torch.equal(back.router.predict_proba(TEXTS), comp.router.predict_proba(TEXTS))
    assert [e.name for e in back.experts.values()] == ["m1", "m2"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("mine")
    with pytest.raises(NotOwnedError):
        comp.save(tmp_path / "other")
    (tmp_path / "c" / "router.safetensors").write_bytes(b"garbage")
    with pytest.raises(DataError, match="damaged or unknown composition"):
        Composition.load(tmp_path / "c")
    with pytest.raises(UsageError, match="is not a composition"):
        Composition.load(tmp_path / "nothing")


def test_bits_per_byte_definition():
    assert bits_per_byte([(math.log(2) * 8, 4, 4), (0.0, 4, 4)]) == pytest.approx(1.0)
