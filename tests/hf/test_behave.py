"""A wrapped model behaves like the model it wraps (issue 14 item 4): experts-implementation switches,
parameter lookup by state_dict key, save -> reload, router logits and aux loss."""

from __future__ import annotations

import contextlib

import pytest
import torch
from transformers import AutoModelForCausalLM

import moekit.hf
from moekit.errors import UsageError
from moekit.hf.private_api import DECODE_SWITCH


def test_set_experts_implementation_raises_while_wrapped(make_model, prompt):
    model = make_model("qwen2_moe")
    model.set_experts_implementation("eager")  # unwrapped: transformers' own switch
    moekit.hf.wrap(model)
    with pytest.raises(UsageError, match=r"set_experts_implementation\(\).*wrapped by moekit.*unwrap"):
        model.set_experts_implementation("grouped_mm")
    with pytest.raises(UsageError, match="wrapped by moekit"):
        model.model.set_experts_implementation("grouped_mm")  # the inner model holds the blocks too
    # generate()'s own switch to batched_mm on GPUs does nothing to a wrapped model (moekit picks its path).
    assert getattr(model, DECODE_SWITCH) is contextlib.nullcontext
    moekit.hf.unwrap(model)
    model.set_experts_implementation("grouped_mm")
    assert model.config._experts_implementation == "grouped_mm"
    assert getattr(model, DECODE_SWITCH) != contextlib.nullcontext  # the class's method again


def test_every_state_dict_key_resolves_to_the_same_tensor(family, make_model):
    model = make_model(family)
    moekit.hf.wrap(model)
    for key, t in model.state_dict(keep_vars=True).items():
        got = model.get_parameter(key) if isinstance(t, torch.nn.Parameter) else model.get_buffer(key)
        assert got is t, key


def test_transformers_loading_sets_moekit_s_parameter_and_unwrap_keeps_it(make_model, prompt):
    """transformers loads a weight with get_submodule(HF path) + setattr: the wrapped layer uses it."""
    model = make_model("qwen2_moe")
    ids = prompt()
    moekit.hf.wrap(model)
    gate = model.get_submodule("model.layers.0.mlp.gate")
    new = torch.nn.Parameter(torch.randn_like(gate.weight))
    gate.weight = new
    assert moekit.hf.wrapped_blocks(model)[0].router.weight is new
    with torch.no_grad():
        want = model(ids).logits
    moekit.hf.unwrap(model)
    assert model.model.layers[0].mlp.gate.weight is new
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fam", ["qwen2_moe", "deepseek_v3"])
def test_save_pretrained_then_from_pretrained_has_no_missing_or_unexpected_keys(fam, make_model, prompt, tmp_path):
    model = make_model(fam)
    ids = prompt()
    moekit.hf.wrap(model)
    with torch.no_grad():
        want = model(ids).logits
    model.save_pretrained(tmp_path)
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    moekit.hf.wrap(loaded.eval())
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, want, atol=1e-5, rtol=1e-5)
    loaded.load_state_dict(model.state_dict(), strict=True)  # a wrapped model takes a wrapped model's keys


@pytest.mark.parametrize("fam", ["olmoe", "qwen2_moe", "qwen3_moe"])
def test_output_router_logits_and_aux_loss_match_on_more_families(fam, make_model, prompt):
    """test_parity checks Mixtral; the same for the other softmax families that record router logits."""
    model = make_model(fam, router_aux_loss_coef=0.02)
    ids = prompt()
    ref = model(ids, labels=ids, output_router_logits=True)
    moekit.hf.wrap(model)
    out = model(ids, labels=ids, output_router_logits=True)
    assert ref.router_logits is not None and len(out.router_logits) == len(ref.router_logits) > 0
    for got, want in zip(out.router_logits, ref.router_logits, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert ref.aux_loss > 0
    torch.testing.assert_close(out.aux_loss, ref.aux_loss, atol=1e-5, rtol=1e-5)


def test_init_weights_reinitialises_wrapped_routers_and_experts(make_model):
    """transformers initialises module by module (`_init_weights`, what init_weights / from_pretrained's
    missing-weight init call): a wrapped block is initialised as its original block, in place."""
    model = make_model("qwen2_moe")
    moekit.hf.wrap(model)
    layer = moekit.hf.wrapped_blocks(model)[0]
    tensors = (layer.router.weight, layer.experts.gate_up_proj, layer.experts.down_proj,
               layer.shared_experts.up_proj.weight)
    with torch.no_grad():
        for t in tensors:
            t.zero_()
    model.apply(model._init_weights)
    std = model.config.initializer_range
    for t in tensors:  # transformers' normal(0, initializer_range) init, on moekit's own Parameters
        assert 0.5 * std < float(t.std()) < 2 * std
    moekit.hf.unwrap(model)
    assert "_init_weights" not in model.__dict__
