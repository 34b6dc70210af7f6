"""Wrapped models decode through MoELayer's inference path (tests/layers/test_inference_path.py): every
wrapped block takes it at every step of a no-grad generate, with the same tokens and logits as the general
path; `output_router_logits=True` still records the router logits (through the general path)."""

from __future__ import annotations

import pytest
import torch

import moekit.hf
from moekit.layers.moe import reference_path


def _count_inference_calls(model) -> list:
    ran = []
    for layer in moekit.hf.wrapped_blocks(model):
        inference_forward = layer._inference_forward
        layer._inference_forward = lambda x_TD, f=inference_forward: ran.append(x_TD.shape[0]) or f(x_TD)
    return ran


@pytest.mark.parametrize("fam", ["mixtral", "qwen3_moe", "deepseek_v3", "qwen2_moe"])
def test_wrapped_decode_takes_the_inference_path(fam, make_model, prompt):
    model = make_model(fam)
    ids = prompt(batch=2, length=6)
    moekit.hf.wrap(model)
    ran = _count_inference_calls(model)
    blocks = len(moekit.hf.wrapped_blocks(model))
    with torch.no_grad():
        fast = model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0,
                              output_logits=True, return_dict_in_generate=True)
        assert ran.count(2) == 3 * blocks and ran.count(12) == blocks  # every decode step (2 tokens), the prompt
        with reference_path():
            ref = model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0,
                                 output_logits=True, return_dict_in_generate=True)
    assert len(ran) == 4 * blocks  # none under reference_path
    assert torch.equal(fast.sequences, ref.sequences)
    for a, b in zip(fast.logits, ref.logits, strict=True):
        assert torch.equal(a, b)


def test_router_logits_are_recorded_in_inference(make_model, prompt):
    model = make_model("qwen3_moe")
    ids = prompt()
    with torch.no_grad():
        expected = model(ids, output_router_logits=True).router_logits
        moekit.hf.wrap(model)
        ran = _count_inference_calls(model)
        out = model(ids, output_router_logits=True)
        assert not ran  # the router-logit hook sends the layer through the general path
        model(ids)
        assert ran
    assert len(out.router_logits) == len(expected)
    for a, b in zip(out.router_logits, expected, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
