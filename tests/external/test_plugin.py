"""The wrap hook of the external harness (moekit_wrap_plugin): every model is wrapped at construction, refusals
surface as errors, the config override applies before modules are built, and uninstall restores transformers."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest
import torch
from transformers import MixtralConfig, MixtralForCausalLM, PreTrainedModel

import moekit.hf

_spec = importlib.util.spec_from_file_location("moekit_wrap_plugin", pathlib.Path(__file__).with_name("moekit_wrap_plugin.py"))
plugin = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(plugin)


def _config(**kw) -> MixtralConfig:
    base = dict(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                intermediate_size=32, num_local_experts=4, num_experts_per_tok=2, hidden_act="silu")
    return MixtralConfig(**{**base, **kw})


@pytest.fixture
def hook():
    before = (PreTrainedModel.__init__, PreTrainedModel.post_init)
    counts = dict(plugin.STATS)
    yield plugin
    plugin.uninstall()
    plugin.STATS.update(counts)
    assert (PreTrainedModel.__init__, PreTrainedModel.post_init) == before


def test_every_construction_is_wrapped_and_uninstall_restores(hook):
    hook.install()
    hook.install()  # idempotent: one layer of patching
    model = MixtralForCausalLM(_config())
    blocks = moekit.hf.wrapped_blocks(model)
    assert [b.hf_class for b in blocks] == ["MixtralSparseMoeBlock"]
    assert hook.STATS["already_wrapped"] >= 1  # the outer model found its inner model's blocks wrapped
    hook.uninstall()
    assert moekit.hf.wrapped_blocks(MixtralForCausalLM(_config())) == []


def test_a_refused_block_fails_the_construction(hook):
    hook.install()
    refused = hook.STATS["refused"]
    with pytest.raises(moekit.hf.UnsupportedBlockError, match="MixtralSparseMoeBlock"):
        MixtralForCausalLM(_config(hidden_act="mish", intermediate_size=48))
    assert hook.STATS["refused"] == refused + 1


def test_config_override_applies_before_the_modules_are_built(hook):
    assert hook.parse_overrides("hidden_act=silu, intermediate_size=48") == {"hidden_act": "silu",
                                                                              "intermediate_size": 48}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        hook.parse_overrides("hidden_act")
    hook.install_config_override({"hidden_act": "silu", "intermediate_size": 48})
    hook.install()
    model = MixtralForCausalLM(_config(hidden_act="gelu", intermediate_size=37))
    assert model.config.hidden_act == "silu"
    assert model.model.layers[0].mlp.experts.down_proj.shape[-1] == 48
    assert len(moekit.hf.wrapped_blocks(model)) == 1


def test_a_model_without_weights_yet_is_wrapped_unverified(hook):
    # transformers' tests build models under `torch.device("meta")` and with weight init skipped (NaN from
    # torch.empty), then fill the weights; the hook wraps them without the parity probe and counts them.
    hook.install()
    unverified = hook.STATS["unverified"]
    with torch.device("meta"):
        model = MixtralForCausalLM(_config())
    assert len(moekit.hf.wrapped_blocks(model)) == 1
    assert hook.STATS["unverified"] == unverified + 1
    hook.uninstall()
    model = MixtralForCausalLM(_config())
    with torch.no_grad():
        model.model.layers[0].mlp.experts.down_proj.fill_(float("nan"))
    hook.wrap_constructed(model)
    assert len(moekit.hf.wrapped_blocks(model)) == 1
    assert hook.STATS["unverified"] == unverified + 2
    model = MixtralForCausalLM(_config())  # finite garbage: the probe names the non-finite output
    with torch.no_grad():
        model.model.layers[0].mlp.experts.down_proj.fill_(3e38)
    hook.wrap_constructed(model)
    assert len(moekit.hf.wrapped_blocks(model)) == 1
    assert hook.STATS["unverified"] == unverified + 3
