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


class _Ops(torch.overrides.TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("fam", ["mixtral", "gpt_oss", "qwen3_moe"])
def test_a_router_without_a_selection_bias_holds_none_and_runs_the_plain_topk(fam, make_model, build_causal, prompt):
    # transformers' softmax routers have no selection bias: the wrapped router holds none (not a zero one), so its
    # dense choice is gate, softmax, top-k and the renormalisation -- no bias add, gather or zero-sum guard --
    # with transformers' logits; a re-route without a bias update keeps none.
    model = make_model(fam) if fam != "gpt_oss" else build_causal(
        "gpt_oss", vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, intermediate_size=48, num_local_experts=6, num_experts_per_tok=2,
        layer_types=["full_attention", "full_attention"], pad_token_id=0, bos_token_id=1, eos_token_id=2)
    ids = prompt()
    with torch.no_grad():
        expected = model(ids).logits
        moekit.hf.wrap(model)
        layer = moekit.hf.wrapped_blocks(model)[0]
        assert layer.router.e_score_correction_bias is None
        with _Ops() as ops:
            layer.router.dense_choice(torch.randn(3, layer.cfg.d_model))
        assert {"add", "gather", "masked_fill", "__eq__", "eq"}.isdisjoint(ops.names), ops.names
        assert "topk" in ops.names and "softmax" in ops.names
        torch.testing.assert_close(model(ids).logits, expected, atol=1e-5, rtol=1e-5)
        with moekit.route(model, k=1):
            assert moekit.hf.wrapped_blocks(model)[0].router.e_score_correction_bias is None
            model(ids)


def test_a_pretrained_selection_bias_is_the_models_own_tensor(make_model):
    model = make_model("deepseek_v3")
    hf_bias = [m.e_score_correction_bias for m in model.modules() if hasattr(m, "e_score_correction_bias")]
    moekit.hf.wrap(model)
    held = [layer.router.e_score_correction_bias for layer in moekit.hf.wrapped_blocks(model)]
    assert hf_bias and len(held) == len(hf_bias) and all(a is b for a, b in zip(held, hf_bias, strict=True))


def test_biased_experts_take_the_rows_experts_from_the_inference_path(build_causal, prompt, monkeypatch):
    # gpt-oss's experts carry per-expert biases: the inference path hands the bank the rows' experts (its sorted
    # expert ids) instead of the bank searching the offsets again; outputs equal the general path's bit for bit.
    from moekit.experts.bank import ExpertBank

    model = build_causal(
        "gpt_oss", vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, intermediate_size=48, num_local_experts=6, num_experts_per_tok=2,
        layer_types=["full_attention", "full_attention"], pad_token_id=0, bos_token_id=1, eos_token_id=2)
    moekit.hf.wrap(model)
    given = []
    forward = ExpertBank.forward
    monkeypatch.setattr(ExpertBank, "forward", lambda self, x_ND, offsets_E, expert_N=None: given.append(
        expert_N is not None) or forward(self, x_ND, offsets_E, expert_N))
    ids = prompt(batch=2, length=3)
    with torch.no_grad():
        fast = model.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0,
                              output_logits=True, return_dict_in_generate=True)
        assert given and all(given)
        given.clear()
        with reference_path():
            ref = model.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0,
                                 output_logits=True, return_dict_in_generate=True)
        assert given and not any(given)
    assert torch.equal(fast.sequences, ref.sequences)
    for a, b in zip(fast.logits, ref.logits, strict=True):
        assert torch.equal(a, b)
