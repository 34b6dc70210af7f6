"""wrap / unwrap: weights shared (same objects), originals restored exactly, clear refusals."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import OlmoeConfig
from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock

import moekit
import moekit.hf
from moekit.hf import HFMoEBlock, UnsupportedBlockError


def _hf_blocks(model, hf_blocks, family):
    return [(n, m) for n, m in model.named_modules() if type(m).__name__ == hf_blocks[family][0]]


def test_wrap_shares_the_blocks_own_tensors(family, make_model, hf_blocks):
    model = make_model(family)
    before = _hf_blocks(model, hf_blocks, family)
    ptrs = sorted(p.data_ptr() for p in model.parameters())
    n_params = sum(p.numel() for p in model.parameters())
    moekit.hf.wrap(model)
    layers = moekit.hf.wrapped_blocks(model)
    assert len(layers) == len(before) == hf_blocks[family][1]
    for (name, block), layer in zip(before, layers, strict=True):
        assert model.get_submodule(name) is layer and isinstance(layer, moekit.MoELayer)
        assert layer.router.weight is block.gate.weight
        assert layer.experts.gate_up_proj is block.experts.gate_up_proj
        assert layer.experts.down_proj is block.experts.down_proj
        assert layer.experts.gate_up_proj.data_ptr() == block.experts.gate_up_proj.data_ptr()
        bias = getattr(block.gate, "e_score_correction_bias", None)
        if bias is not None:
            assert layer.router.e_score_correction_bias is bias
        shared = getattr(block, "shared_experts", None) or getattr(block, "shared_expert", None)
        assert (layer.shared_experts is None) == (shared is None)
        if shared is not None:
            for proj in ("gate_proj", "up_proj", "down_proj"):
                assert getattr(layer.shared_experts, proj) is getattr(shared, proj)
        assert layer.shared_expert_gate is getattr(block, "shared_expert_gate", None)
    # No new parameter storage and no lost parameter: the same tensors, nothing copied.
    assert sorted(p.data_ptr() for p in model.parameters()) == ptrs
    assert sum(p.numel() for p in model.parameters()) == n_params


def test_unwrap_restores_the_original_modules(family, make_model, hf_blocks, prompt):
    model = make_model(family)
    modules = dict(model.named_modules())
    ids = prompt()
    with torch.no_grad():
        ref = model(ids).logits
    moekit.hf.wrap(model)
    assert moekit.hf.unwrap(model) is model
    assert not moekit.hf.wrapped_blocks(model)
    after = dict(model.named_modules())
    assert after.keys() == modules.keys()
    assert all(after[n] is m for n, m in modules.items())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)


def test_wrap_is_idempotent(make_model):
    model = make_model("deepseek_v3")
    moekit.hf.wrap(model)
    layers = moekit.hf.wrapped_blocks(model)
    assert moekit.hf.wrap(model) is model
    assert moekit.hf.wrapped_blocks(model) == layers  # the same layer objects, not wrapped twice
    assert all(isinstance(layer._hf_block, nn.Module) and not isinstance(layer._hf_block, HFMoEBlock)
               for layer in layers)
    moekit.hf.unwrap(model)
    assert not any(isinstance(m, HFMoEBlock) for m in model.modules())


def test_state_dict_keeps_the_transformers_names(family, make_model):
    model = make_model(family)
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    moekit.hf.wrap(model)
    sd = model.state_dict()
    assert list(sd) == list(ref)  # same names, same order: a wrapped model saves as the original
    assert all(torch.equal(sd[k], ref[k]) for k in ref)
    # ... and loads from them (strict), including a moekit-only zero bias the HF model does not have.
    mutated = {k: v + 1 if k.endswith("gate.weight") else v for k, v in ref.items()}
    model.load_state_dict(mutated)
    layer = moekit.hf.wrapped_blocks(model)[0]
    name = next(n for n, m in model.named_modules() if m is layer)
    torch.testing.assert_close(layer.router.weight, mutated[f"{name}.gate.weight"], rtol=0, atol=0)
    assert not torch.equal(layer.router.weight, ref[f"{name}.gate.weight"])  # really changed


def test_dtype_and_device_unchanged_and_to_after_wrap(make_model, prompt):
    model = make_model("deepseek_v3")
    moekit.hf.wrap(model)
    model.to(torch.float64)  # moves moekit layers and their shared tensors together
    layer = moekit.hf.wrapped_blocks(model)[0]
    assert layer.experts.gate_up_proj.dtype == torch.float64
    assert layer.router.e_score_correction_bias.dtype == torch.float32  # routing state is never cast (issue 11, item 6)
    with torch.no_grad():
        assert model(prompt()).logits.dtype == torch.float64
    block = layer.original()
    assert block.experts.gate_up_proj is layer.experts.gate_up_proj
    assert block.gate.e_score_correction_bias is layer.router.e_score_correction_bias  # a new tensor after .to()
    moekit.hf.unwrap(model)
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    assert all(b.dtype == torch.float32 for n, b in model.named_buffers() if "e_score" in n)


def test_repr_names_the_family_and_rule(make_model):
    model = moekit.hf.wrap(make_model("deepseek_v3"))
    text = repr(moekit.hf.wrapped_blocks(model)[0])
    assert "hf=DeepseekV3MoE" in text and "score=sigmoid" in text and "groups=2/4" in text and "scale=2.5" in text


def test_wrapped_layers_train(make_model, prompt):
    """Wrapped layers are ordinary MoELayers: training mode, aux losses and gradients into the HF weights."""
    model = moekit.hf.wrap(make_model("olmoe")).train()
    tracker = moekit.BalanceTracker(model)
    ids = prompt()
    model(ids, labels=ids).loss.backward()
    layer = moekit.hf.wrapped_blocks(model)[0]
    assert layer.training and set(layer.routing_info().aux) >= {"load_balance", "z_loss"}
    assert layer.experts.gate_up_proj.grad.abs().max() > 0
    assert int(tracker.counts(layer).executed_E.sum()) == ids.numel() * 2  # k=2 assignments per token counted
    moekit.after_optimizer_step(model)
    assert int(tracker.counts(layer).executed_E.sum()) == 0


# ------------------------------------------------------------------------------------------- refusals
def test_no_moe_block_is_a_clear_error():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with pytest.raises(UnsupportedBlockError, match="found no sparse MoE block in Sequential"):
        moekit.hf.wrap(model)


def test_moekit_models_are_not_transformers_blocks():
    model = nn.Sequential(moekit.MoELayer(moekit.MoEConfig()))
    with pytest.raises(UnsupportedBlockError, match="found no sparse MoE block"):
        moekit.hf.wrap(model)


def test_unsupported_family_is_refused_by_class_name(monkeypatch):
    """A block class in detect.UNEXPRESSED (its forward does something its parts do not say) is refused by name,
    nothing replaced (NLLB-MoE was the example until it wrapped: tests/hf/test_nllb.py)."""
    import moekit.hf.detect as detect

    monkeypatch.setitem(detect.UNEXPRESSED, "OlmoeSparseMoeBlock", "the reason the table states")
    model = _Parent(_olmoe_block())
    block = model.mlp
    with pytest.raises(UnsupportedBlockError, match="cannot wrap OlmoeSparseMoeBlock: the reason the table states"):
        moekit.hf.wrap(model)
    assert model.mlp is block  # nothing replaced


class _Parent(nn.Module):
    def __init__(self, block):
        super().__init__()
        self.mlp = block


def _olmoe_cfg() -> OlmoeConfig:
    return OlmoeConfig(hidden_size=32, intermediate_size=16, num_experts=4, num_experts_per_tok=2,
                       experts_implementation="eager")


def _olmoe_block(cls=OlmoeSparseMoeBlock, seed: int = 0) -> OlmoeSparseMoeBlock:
    block = cls(_olmoe_cfg())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return block


def test_a_rule_moekit_does_not_read_is_caught_by_the_probe():
    """A block that looks standard but routes differently (here: a temperature on the logits)."""
    block = _olmoe_block()

    class HotRouter(type(block.gate)):
        def forward(self, hidden_states):
            logits, _, _ = super().forward(hidden_states)
            w, idx = torch.topk(torch.softmax(logits.float() / 2.0, dim=-1), self.top_k, dim=-1)
            return logits, w, idx

    hot = HotRouter(_olmoe_cfg())
    hot.load_state_dict(block.gate.state_dict())
    block.gate = hot
    with pytest.raises(UnsupportedBlockError,
                       match=r"cannot wrap OlmoeSparseMoeBlock: its router \(HotRouter\).*other experts or weights"):
        moekit.hf.wrap(_Parent(block))
    moekit.hf.wrap(_Parent(block), verify=False)  # the caller may skip the check, at their own risk


def test_a_block_forward_moekit_does_not_run_is_caught_by_the_probe():
    class DoubledBlock(OlmoeSparseMoeBlock):
        def forward(self, hidden_states):
            return 2 * super().forward(hidden_states)

    block = _olmoe_block(DoubledBlock)
    with pytest.raises(UnsupportedBlockError, match="cannot wrap DoubledBlock: .*differs from the block's own"):
        moekit.hf.wrap(_Parent(block))


def test_extra_tensors_are_refused_by_name():
    block = _olmoe_block()
    block.gate.bias = nn.Parameter(torch.randn(4))  # a logit bias this router's forward ignores
    with pytest.raises(UnsupportedBlockError, match=r"OlmoeSparseMoeBlock: its router .*other experts or weights"):
        moekit.hf.wrap(_Parent(block))
    block = _olmoe_block()
    block.post_norm = nn.LayerNorm(32)
    with pytest.raises(UnsupportedBlockError, match=r"its child `post_norm` \(LayerNorm\) is neither a router"):
        moekit.hf.wrap(_Parent(block))
    block = _olmoe_block()
    block.gate2 = nn.Linear(32, 4, bias=False)  # before: "`gate2` and another child with a weight (E, D)"
    with pytest.raises(UnsupportedBlockError, match=r"it has two routers, `gate` and `gate2` \(each a child with a "
                                                    r"weight \(R, D=32\), R >= E=4\)"):
        moekit.hf.wrap(_Parent(block))
    block = _olmoe_block()
    block.experts.scale = nn.Parameter(torch.ones(4))
    with pytest.raises(UnsupportedBlockError, match=r"its experts hold tensors \['scale'\]"):
        moekit.hf.wrap(_Parent(block))


def test_experts_with_an_activation_moekit_lacks_are_refused():
    block = _olmoe_block()
    block.experts.act_fn = nn.Tanh()
    with pytest.raises(UnsupportedBlockError, match="gating .* matches none of moekit's gated activations"):
        moekit.hf.wrap(_Parent(block))


def test_wrapping_a_bare_block_is_refused():
    with pytest.raises(UnsupportedBlockError, match="pass the whole model"):
        moekit.hf.wrap(_olmoe_block())


def test_deepcopy_of_a_wrapped_model_stays_consistent(make_model, prompt):
    model = moekit.hf.wrap(make_model("qwen2_moe"))
    clone = copy.deepcopy(model)
    layer = moekit.hf.wrapped_blocks(clone)[0]
    assert layer.router.weight is layer._hf_block.gate.weight  # sharing survives the copy
    ids = prompt()
    with torch.no_grad():
        torch.testing.assert_close(clone(ids).logits, model(ids).logits)
    moekit.hf.unwrap(clone)
    assert type(clone.model.layers[0].mlp).__name__ == "Qwen2MoeSparseMoeBlock"


def test_padding_mask_reaches_the_moekit_layer(make_model):
    """A wrapped block is still a MoELayer: moekit callers may pass a padding mask."""
    layer = moekit.hf.wrapped_blocks(moekit.hf.wrap(make_model("olmoe")))[0]
    x = torch.randn(2, 5, 64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    with torch.no_grad():
        y = layer(x, padding_mask=mask)
        assert layer.routing_info().num_tokens == 8  # padding is neither routed nor counted
        y_ref = layer(x)
    torch.testing.assert_close(y[mask], y_ref[mask])
    assert torch.equal(y[~mask], torch.zeros_like(y[~mask]))  # padding tokens get no expert output
