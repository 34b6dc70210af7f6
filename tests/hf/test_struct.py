"""Issue #14, expert and block structures: families whose blocks hold more than a router and a stacked
bank, wrapped as configurations of moekit's pieces (zero-computation experts, latent projections,
non-gated shared MLPs with biases, ...). Each family: logits to 1e-5, 16 greedy tokens with the KV
cache identical, the model's own tensors shared (same objects, same storage), every state_dict key
resolving on the wrapped model, and unwrap restoring the very same modules."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import moekit
import moekit.hf

_BASE = dict(vocab_size=128, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
             max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)

# family -> (config kwargs, the HF block class, what moekit must read from it)
FAMILIES = {
    # 2 identity experts past the 8 FFN experts (router columns 8, 9), gate_up_proj rows allocated for them
    "longcat_flash": (dict(num_layers=2, n_routed_experts=8, moe_topk=2, zero_expert_num=2, expert_ffn_hidden_size=16,
                           ffn_hidden_size=48, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8,
                           qk_nope_head_dim=8, v_head_dim=16, routed_scaling_factor=2.0),
                      "LongcatFlashMoE", dict(copy_experts=2, zero_experts=0, layout="spare=2")),
    # latent MoE: D=32 -> l=16 around non-gated ReLU^2 experts; a non-gated ReLU^2 shared MLP; biases (mlp_bias)
    "nemotron_h": (dict(layers_block_type=["attention", "moe", "moe"], n_routed_experts=8, num_experts_per_tok=2,
                        moe_intermediate_size=16, moe_shared_expert_intermediate_size=24, moe_latent_size=16,
                        mlp_bias=True, n_group=2, topk_group=1),
                   "NemotronHMoE", dict(latent_dim=16, activation="relu2", d_shared=24)),
    # no latent projections (nn.Identity children play no role), no biases
    "nemotron_h-plain": (dict(layers_block_type=["attention", "moe"], n_routed_experts=8, num_experts_per_tok=2,
                              moe_intermediate_size=16, moe_shared_expert_intermediate_size=24),
                         "NemotronHMoE", dict(latent_dim=None, activation="relu2")),
}


@pytest.fixture
def build(randomized):
    def make(family: str) -> torch.nn.Module:
        cfg = AutoConfig.for_model(family.split("-")[0], **{**_BASE, **FAMILIES[family][0]})
        torch.manual_seed(0)
        return randomized(AutoModelForCausalLM.from_config(cfg)).eval()

    return make


def _blocks(model, cls_name):
    return [(n, m) for n, m in model.named_modules() if type(m).__name__ == cls_name]


def check_wrap_parity(model, cls_name: str, ids: torch.Tensor) -> list:
    """Wrap `model` and check the module doc's five properties; returns the wrapped layers."""
    with torch.no_grad():
        ref = model(ids).logits
        ref_gen = model.generate(ids, max_new_tokens=16, do_sample=False, min_new_tokens=16, pad_token_id=0)
    blocks = _blocks(model, cls_name)
    assert blocks
    hf_ptrs = {p.data_ptr() for p in model.parameters()}
    keys = list(model.state_dict())
    moekit.hf.wrap(model)
    layers = moekit.hf.wrapped_blocks(model)
    assert len(layers) == len(blocks)
    assert {p.data_ptr() for p in model.parameters()} == hf_ptrs  # no copies
    for (_, block), wrapped in zip(blocks, layers, strict=True):
        theirs = {id(t) for t in block.state_dict(keep_vars=True).values()}
        assert all(id(t) in theirs for t in wrapped.state_dict(keep_vars=True).values())
    assert list(model.state_dict()) == keys
    for key in keys:  # every key resolves on the wrapped model (transformers' loading needs it)
        owner, _, leaf = key.rpartition(".")
        assert leaf in model.get_submodule(owner)._parameters or leaf in model.get_submodule(owner)._buffers, key
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref, atol=1e-5, rtol=1e-5)
        gen = model.generate(ids, max_new_tokens=16, do_sample=False, min_new_tokens=16, pad_token_id=0)
    assert torch.equal(gen, ref_gen)
    moekit.hf.unwrap(model)
    assert [m for _, m in _blocks(model, cls_name)] == [b for _, b in blocks]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)
    moekit.hf.wrap(model)
    return layers


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_wraps_with_exact_parity(family, build):
    _, cls_name, want = FAMILIES[family]
    model = build(family)
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    layer = check_wrap_parity(model, cls_name, ids)[0]
    for name, value in want.items():
        got = layer.experts.layout.describe() if name == "layout" else getattr(layer.cfg, name)
        assert got == value, (name, got)


def test_longcat_identity_experts_are_routed_and_share_the_rows(build):
    """The identity columns are picked on real input (else parity proves nothing about them), and the
    bank's input stack is the model's own (E + 2, 2F, D) Parameter, viewed (E, 2F, D)."""
    model = build("longcat_flash")
    block = _blocks(model, "LongcatFlashMoE")[0][1]
    moekit.hf.wrap(model)
    layer = moekit.hf.wrapped_blocks(model)[0]
    assert layer.experts.gate_up_proj is block.experts.gate_up_proj
    assert layer.experts.w_in.shape[0] == 8 and layer.experts.w_in.data_ptr() == block.experts.gate_up_proj.data_ptr()
    assert layer.router.weight is block.router.classifier.weight
    with torch.no_grad():
        model(torch.randint(3, 128, (4, 32), generator=torch.Generator().manual_seed(2)))
    assert layer.routing_info().zero_compute["copy"] > 0


def test_nemotron_latent_and_shared_modules_are_the_models(build):
    model = build("nemotron_h")
    block = _blocks(model, "NemotronHMoE")[0][1]
    moekit.hf.wrap(model)
    layer = moekit.hf.wrapped_blocks(model)[0]
    assert layer.fc1_latent_proj is block.fc1_latent_proj and layer.fc2_latent_proj is block.fc2_latent_proj
    assert layer.shared_experts.up_proj is block.shared_experts.up_proj and layer.shared_experts.gate_proj is None
    assert layer.fc1_latent_proj.bias is not None  # mlp_bias: biases come with the modules
