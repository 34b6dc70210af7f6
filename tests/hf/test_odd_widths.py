"""moekit.hf.wrap on transformers models whose expert rows are not 16-byte aligned (intermediate
size 37, as in transformers' own tiny test configs; 1 and 129; an odd-width hidden size 42): the
probe no longer crashes, and the wrapped model computes what transformers' eager experts compute,
logits, gradients and greedy generation (issue 11, item 14)."""

from __future__ import annotations

import pytest
import torch

import moekit
import moekit.hf
from moekit.ops import grouped

TOL = {"atol": 1e-5, "rtol": 1e-5}
ODD_D = {"hidden_size": 42, "num_attention_heads": 3, "num_key_value_heads": 3, "head_dim": 14}
CASES = [("mixtral", 37, {}), ("olmoe", 37, {}), ("olmoe", 1, {}), ("mixtral", 129, ODD_D), ("olmoe", 37, ODD_D)]


def _odd_model(make_model, family, F, extra):
    model = make_model(family, intermediate_size=F, **extra)
    assert model.config._experts_implementation == "grouped_mm"  # transformers' default, which crashes on these
    return model


def _eager_logits(model, ids):
    """transformers' own logits, with its eager experts (its grouped_mm kernel refuses these widths)."""
    model.set_experts_implementation("eager")
    try:
        with torch.no_grad():
            return model(ids).logits
    finally:
        model.set_experts_implementation("grouped_mm")


@pytest.mark.parametrize("family,F,extra", CASES, ids=[f"{f}-F{w}-D{e.get('hidden_size', 64)}" for f, w, e in CASES])
def test_wrap_runs_odd_widths_and_matches_transformers(family, F, extra, make_model, prompt):
    model = _odd_model(make_model, family, F, extra)
    ids = prompt()
    ref = _eager_logits(model, ids)
    moekit.hf.wrap(model)  # runs the probe: it used to crash inside torch._grouped_mm
    assert model.config._experts_implementation == "grouped_mm"  # the probe's switch to eager is undone
    blocks = moekit.hf.wrapped_blocks(model)
    assert len(blocks) == 2 and blocks[0].cfg.d_expert == F
    with grouped.record() as ran, torch.no_grad():
        out = model(ids).logits
    assert ran["forward", "loop"] > 0  # the GEMMs reading rows of width F fell back
    assert ref.abs().max() > 1.0
    torch.testing.assert_close(out, ref, **TOL)


def test_odd_width_gradients_and_generation_match_transformers(make_model, prompt):
    model = _odd_model(make_model, "mixtral", 37, {})
    ids = prompt()
    model.set_experts_implementation("eager")
    model(ids, labels=ids).loss.backward()
    want = {n: (p, p.grad.clone()) for n, p in model.named_parameters()}
    with torch.no_grad():
        gen_ref = model.generate(ids[:, :6], max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
    model.zero_grad()
    model.set_experts_implementation("grouped_mm")
    moekit.hf.wrap(model)
    with grouped.record() as ran:
        model(ids, labels=ids).loss.backward()
    assert ran["dx", "loop"] > 0 and ran["dw", "loop"] > 0
    for n, (p, g) in want.items():  # the same Parameter objects, now under moekit's modules
        assert g.abs().max() > 0, n
        torch.testing.assert_close(p.grad, g, atol=1e-4, rtol=1e-4, msg=n)
    with torch.no_grad():
        gen = model.generate(ids[:, :6], max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(gen, gen_ref)
