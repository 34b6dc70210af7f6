"""Issue #14 item 2: families moekit refuses name the block and the exact feature it lacks (never a generic
"no place for it"), read by role from the block's parts. Each builds the real transformers class."""

from __future__ import annotations

import pytest

import moekit.hf

_BASE = dict(vocab_size=128, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
             max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2, num_hidden_layers=2)

# family -> (config kwargs, the block class, phrases the refusal must contain)
REFUSED = {
    # an MLP router carrying its hidden state to the next layer's router (ZAYA1's EDA), with a skip class
    "zaya": (dict(num_experts=8, num_experts_per_tok=1, moe_intermediate_size=16), "ZayaSparseMoeBlock",
             ("`gate` (ZayaRouter)", "carries a state across layers", "`router_states`", "MLP of 4 Linear",
              "E + 1: a skip class")),
    # single-neuron experts picked by product keys
    "doge": (dict(is_moe=True, num_experts=16, num_experts_per_tok=2), "DogeCDMoE",
             ("single neurons", "product keys")),
}


@pytest.mark.parametrize("family", list(REFUSED))
def test_refusal_names_block_and_feature(family, build_causal):
    kwargs, cls_name, phrases = REFUSED[family]
    model = build_causal(family, **{**_BASE, **kwargs})
    before = dict(model.named_modules())
    with pytest.raises(moekit.hf.UnsupportedBlockError) as err:
        moekit.hf.wrap(model)
    message = str(err.value)
    assert f"cannot wrap {cls_name}:" in message
    for phrase in phrases:
        assert phrase in message, (phrase, message)
    after = dict(model.named_modules())  # a refusal leaves the model as it was
    assert after.keys() == before.keys() and all(after[n] is before[n] for n in before)


def test_stacked_shared_experts_that_are_not_inklings_are_refused_by_feature(build_causal):
    """Stacked always-on experts weighted by the router, but holding a tensor moekit's shared bank has no place
    for (here an added bias), are refused naming the feature rather than read half."""
    import torch

    model = build_causal("inkling_text", **{**_BASE, **dict(n_routed_experts=8, num_experts_per_tok=2,
                                                           moe_intermediate_size=16, unpadded_vocab_size=128)})
    for m in model.modules():
        if type(m).__name__ == "InklingSharedExperts":
            m.register_parameter("bias", torch.nn.Parameter(torch.zeros(1, 16)))
    with pytest.raises(moekit.hf.UnsupportedBlockError, match=r"cannot wrap InklingMoE: its child `shared_experts` "
                       r"\(InklingSharedExperts\) holds 2 stacked always-on expert.*`gammas`.*'bias'"):
        moekit.hf.wrap(model)
