"""A model built on the meta device (big-model loading) wraps; its parity probe runs once the weights
exist, at each block's first forward or with moekit.hf.verify(model), and refuses exactly as the eager
probe does (issue 14 item 4)."""

from __future__ import annotations

import importlib

import pytest
import torch
from transformers import AutoModelForCausalLM, Llama4TextConfig, MixtralConfig

import moekit.hf
from moekit.hf import UnsupportedBlockError

wrap_module = importlib.import_module("moekit.hf.wrap")  # the module, not the function moekit.hf.wrap

SMALL = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def _configs():
    return {"mixtral": MixtralConfig(**SMALL, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2),
            # Llama 4's weight on the expert input is read by the probe (an alternative reading): on meta
            # weights the first reading is the wrong one, so the deferred probe must pick the other.
            "llama4": Llama4TextConfig(**SMALL, head_dim=8, intermediate_size=32, intermediate_size_mlp=48,
                                       num_local_experts=4, num_experts_per_tok=1)}


def _pair(family: str):
    """(a real model with random weights, the same architecture built on the meta device)."""
    cfg = _configs()[family]
    torch.manual_seed(0)
    real = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # routers start at zero in transformers' init: every score would tie
        for p in real.parameters():
            if p.dim() > 1:
                p.normal_(0, p.shape[-1] ** -0.5)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(cfg).eval()
    return real, meta


def _load(meta, real, how: str) -> None:
    """Materialise `meta` with `real`'s weights, as big-model loading does."""
    if how == "assign":
        meta.load_state_dict(real.state_dict(), assign=True)
    else:
        meta.to_empty(device="cpu")
        meta.load_state_dict(real.state_dict())
    # non-persistent buffers (the rotary inv_freq) are in no state_dict: transformers recomputes them on load
    meta.model.rotary_emb = real.model.rotary_emb


@pytest.fixture
def probes(monkeypatch):
    """Counts the block probes wrap runs."""
    calls = []
    real = wrap_module.verify_block

    def counting(spec, layer):
        calls.append(spec.class_name)
        return real(spec, layer)

    monkeypatch.setattr(wrap_module, "verify_block", counting)
    return calls


@pytest.mark.parametrize("family, how", [("mixtral", "assign"), ("llama4", "to_empty")])
def test_meta_built_model_wraps_and_probes_at_the_first_forward(family, how, probes):
    real, meta = _pair(family)
    moekit.hf.wrap(meta)
    assert probes == []  # nothing to probe on meta weights
    blocks = moekit.hf.wrapped_blocks(meta)
    assert len(blocks) == 2
    _load(meta, real, how)
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = real(ids).logits
        out = meta(ids).logits
    assert probes  # the deferred probe ran, once per block ...
    ran = len(probes)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert moekit.hf.wrapped_blocks(meta) == blocks  # the same layer objects, now verified readings
    with torch.no_grad():
        meta(ids)
    assert len(probes) == ran  # ... and never again
    if family == "llama4":
        assert all(b.cfg.weight_on_input for b in blocks)  # the reading the eager probe picks
    gen = meta.generate(ids[:1, :4], max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(gen, real.generate(ids[:1, :4], max_new_tokens=8, do_sample=False, pad_token_id=0))


def _double(block) -> None:
    """Make a transformers block compute something moekit's reading does not (its output doubled)."""
    forward = block.forward
    block.forward = lambda *a, **k: forward(*a, **k) * 2


def test_a_mismatching_block_is_refused_at_the_first_forward_as_eagerly(probes):
    real, meta = _pair("mixtral")
    moekit.hf.wrap(meta)
    _load(meta, real, "assign")
    _double(moekit.hf.wrapped_blocks(meta)[0].original())
    for m in real.modules():
        if type(m).__name__ == "MixtralSparseMoeBlock":
            _double(m)
            break
    with pytest.raises(UnsupportedBlockError) as eager:
        moekit.hf.wrap(real)
    with pytest.raises(UnsupportedBlockError) as deferred, torch.no_grad():
        meta(torch.randint(0, 64, (1, 6)))
    assert str(deferred.value) == str(eager.value)
    assert "differs from the block's own on a probe input" in str(deferred.value)


def test_explicit_verify_and_weights_still_on_meta(probes):
    real, meta = _pair("mixtral")
    moekit.hf.wrap(meta)
    with pytest.raises(UnsupportedBlockError, match="on the meta device .not loaded yet.; load them"):
        moekit.hf.verify(meta)
    probes.clear()
    _load(meta, real, "assign")
    assert moekit.hf.verify(meta) is meta and len(probes) == 2
    with torch.no_grad():
        meta(torch.randint(0, 64, (1, 6)))
    assert len(probes) == 2  # verified already: the first forward probes nothing
    assert isinstance(moekit.hf.unwrap(meta).model.layers[0].mlp, type(real.model.layers[0].mlp))
