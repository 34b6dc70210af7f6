"""Wrapped-only failures found by transformers' own model tests (tests/external), reproduced on tiny configs
without the external files: each test here failed before its fix in moekit.hf."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, GptOssConfig, MixtralConfig

import moekit.hf
from moekit.hf import HFMoEBlock

_TINY = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=64, pad_token_id=0)


def _config(kind: str):
    if kind == "gpt_oss":
        return GptOssConfig(**_TINY, intermediate_size=48, num_local_experts=6, num_experts_per_tok=2,
                            layer_types=["full_attention", "sliding_attention"], sliding_window=16)
    # transformers' testers: gated GELU experts of width 37
    return MixtralConfig(**_TINY, intermediate_size=37, num_local_experts=6, num_experts_per_tok=2,
                         hidden_act={"mixtral-gelu": "gelu", "mixtral": "silu"}[kind])


@pytest.mark.parametrize("kind", ["mixtral", "mixtral-gelu", "gpt_oss"])
def test_a_model_built_under_the_meta_device_context_wraps(kind):
    # test_can_be_initialized_on_meta, from_pretrained and the loading tests build models inside
    # `with torch.device("meta")`: the activation probe must not inherit that device (it read values of meta tensors).
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(_config(kind))
        moekit.hf.wrap(model, verify=False)
    layers = [m for m in model.modules() if isinstance(m, HFMoEBlock)]
    assert len(layers) == 2
    assert all(p.is_meta for p in model.parameters())


def test_weights_not_initialised_yet_are_named_not_blamed_on_the_rule():
    # test_init_weights_can_init_buffers builds models with transformers' weight init skipped (torch.empty:
    # NaN); the probe then refused "its routing rule is not one moekit has". It names the weights instead.
    model = AutoModelForCausalLM.from_config(_config("mixtral"))
    with torch.no_grad():
        model.model.layers[1].mlp.gate.weight[0, 0] = float("nan")
    with pytest.raises(moekit.hf.UnsupportedBlockError, match=r"weights \['router'\] are not finite"):
        moekit.hf.wrap(model)
    assert moekit.hf.wrapped_blocks(model) == []  # all or nothing: the finite first block is not replaced either
    assert len(moekit.hf.wrapped_blocks(moekit.hf.wrap(model, verify=False))) == 2
