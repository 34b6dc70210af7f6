"""SparseMixer (Phi-3.5-MoE / GRIN-MoE, arXiv 2409.12136) against a transcription of the reference:
transformers' `modeling_phimoe.sparsemixer` and `PhimoeMultiplier` (from microsoft/GRIN-MoE), evaluation and
training (same seed: the same Gumbel samples, Heun coins, values and gradients)."""

from __future__ import annotations

import pytest
import torch

import moekit
from moekit.config import MoEConfig, RouterConfig
from moekit.routers.sparsemixer import sparsemixer


class _Multiplier(torch.autograd.Function):
    """transformers' PhimoeMultiplier, transcribed."""

    @staticmethod
    def forward(ctx, scores, multiplier, selected_experts, masked_gates, mask_for_one):
        ctx.save_for_backward(multiplier, selected_experts, masked_gates)
        return multiplier * mask_for_one

    @staticmethod
    def backward(ctx, grad_at_output):
        multiplier, selected_experts, masked_gates = ctx.saved_tensors
        grad_at_output = grad_at_output * multiplier
        grad_at_scores_expanded = masked_gates * grad_at_output.mul(-1)
        grad_at_scores_expanded.scatter_add_(dim=-1, index=selected_experts, src=grad_at_output)
        return grad_at_scores_expanded, None, None, None, None


def _reference(scores, jitter_eps, training):
    """transformers' sparsemixer (top-2), transcribed line by line."""
    with torch.no_grad():
        mask_logits_threshold, max_ind = scores.max(dim=-1, keepdim=True)
        factor = scores.abs().clamp(min=mask_logits_threshold)
        mask_logits_threshold = ((mask_logits_threshold - scores) / factor) > (2 * jitter_eps)
    masked_gates = scores.masked_fill(mask_logits_threshold, float("-inf"))
    if training:
        selected_experts = (masked_gates - torch.empty_like(
            masked_gates, memory_format=torch.legacy_contiguous_format).exponential_().log()).max(dim=-1)[1].unsqueeze(-1)
    else:
        selected_experts = max_ind
    masked_gates = torch.softmax(masked_gates, dim=-1)
    multiplier_o = masked_gates.gather(dim=-1, index=selected_experts)
    if training:
        max_scores, max_ind = masked_gates.max(dim=-1, keepdim=True)
        mask_for_one = torch.logical_or(selected_experts == max_ind, torch.rand_like(max_scores) > 0.75)
        mask_for_one = torch.add(0.3333, mask_for_one, alpha=0.6667).type_as(masked_gates)
        multiplier = _Multiplier.apply(scores, multiplier_o, selected_experts, masked_gates, mask_for_one)
    else:
        multiplier = multiplier_o
    masked_scores = torch.scatter(scores, -1, selected_experts, float("-inf"))
    with torch.no_grad():
        mask_logits_threshold, max_ind = masked_scores.max(dim=-1, keepdim=True)
        factor = scores.abs().clamp(min=mask_logits_threshold)
        mask_logits_threshold = ((mask_logits_threshold - scores) / factor) > (2 * jitter_eps)
    masked_gates_top2 = masked_scores.masked_fill(mask_logits_threshold, float("-inf"))
    if training:
        selected_experts_top2 = (masked_gates_top2 - torch.empty_like(
            masked_gates_top2, memory_format=torch.legacy_contiguous_format).exponential_().log()
        ).max(dim=-1)[1].unsqueeze(-1)
    else:
        selected_experts_top2 = max_ind
    masked_gates_top2 = torch.softmax(masked_gates_top2, dim=-1)
    multiplier_top2_o = masked_gates_top2.gather(dim=-1, index=selected_experts_top2)
    if training:
        max_scores, max_ind = masked_gates_top2.max(dim=-1, keepdim=True)
        mask_for_one_top2 = torch.logical_or(selected_experts_top2 == max_ind,
                                             torch.rand_like(max_scores).uniform_() > 0.75)
        mask_for_one_top2 = torch.add(0.3333, mask_for_one_top2, alpha=0.6667).type_as(masked_gates_top2)
        multiplier_top2 = _Multiplier.apply(scores, multiplier_top2_o, selected_experts_top2, masked_gates_top2,
                                            mask_for_one_top2)
    else:
        multiplier_top2 = multiplier_top2_o
    return (torch.concat((multiplier, multiplier_top2), dim=-1),
            torch.concat((selected_experts, selected_experts_top2), dim=-1))


def _logits(T=64, E=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=g)
    # Near-ties, so that the band (2 * eps relative to the max) holds more than one expert for many tokens.
    logits[: T // 2, 1] = logits[: T // 2, 0] * (1 - 0.01 * torch.rand(T // 2, generator=g))
    return logits


@pytest.mark.parametrize("eps", [0.01, 0.3])
def test_eval_matches_the_reference(eps):
    logits = _logits()
    w_ref, idx_ref = _reference(logits, eps, training=False)
    idx, w = sparsemixer(logits, 2, eps, training=False)
    assert torch.equal(idx, idx_ref)
    torch.testing.assert_close(w, w_ref, rtol=0, atol=0)
    # The band matters: with it the first weight is below 1 for some tokens, without it always 1.
    assert bool((w[:, 0] < 1).any()) and torch.equal(sparsemixer(logits, 2, 0.0, False)[1][:, 0], torch.ones(64))


@pytest.mark.parametrize("eps", [0.01, 0.3])
def test_training_matches_the_reference_values_and_gradients(eps):
    logits = _logits(seed=1)
    ref_in = logits.clone().requires_grad_(True)
    mine_in = logits.clone().requires_grad_(True)
    upstream = torch.randn(64, 2, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(7)
    w_ref, idx_ref = _reference(ref_in, eps, training=True)
    torch.manual_seed(7)
    idx, w = sparsemixer(mine_in, 2, eps, training=True)
    assert torch.equal(idx, idx_ref)
    torch.testing.assert_close(w, w_ref, rtol=0, atol=0)
    (w_ref * upstream).sum().backward()
    (w * upstream).sum().backward()
    torch.testing.assert_close(mine_in.grad, ref_in.grad, rtol=1e-6, atol=1e-7)
    if eps == 0.3:  # a wide band: training samples some experts that are not the argmax
        assert not torch.equal(idx, sparsemixer(logits, 2, eps, training=False)[0])


def test_k1_is_the_first_pick_and_k3_never_repeats_an_expert():
    logits = _logits()
    idx2, w2 = sparsemixer(logits, 2, 0.05, False)
    idx1, w1 = sparsemixer(logits, 1, 0.05, False)
    assert torch.equal(idx1, idx2[:, :1]) and torch.equal(w1, w2[:, :1])
    idx3, _ = sparsemixer(logits, 3, 0.05, False)
    assert torch.equal(idx3[:, :2], idx2)
    assert all(len(set(row)) == 3 for row in idx3.tolist())


def test_router_in_a_moekit_layer_trains_and_honours_disabled_experts():
    torch.manual_seed(0)
    cfg = MoEConfig(d_model=16, d_expert=8, num_experts=6, router=RouterConfig(kind="sparsemixer", k=2,
                                                                                jitter_eps=0.1))
    layer = moekit.MoELayer(cfg)
    x = torch.randn(2, 10, 16)
    layer.train()
    layer(x).square().sum().backward()
    assert layer.router.weight.grad is not None and bool(layer.router.weight.grad.abs().sum() > 0)
    layer.eval()
    with moekit.mask_experts(layer, disabled={0: [0, 3]}), torch.no_grad():
        layer(x)
    assert not bool(torch.isin(layer.routing_info().route.expert_idx_N, torch.tensor([0, 3])).any())


def test_config_is_validated_and_refuses_export():
    with pytest.raises(ValueError, match="RouterConfig.jitter_eps=-0.1 is invalid"):
        RouterConfig(kind="sparsemixer", jitter_eps=-0.1).validate(8)
    with pytest.raises(ValueError, match="RouterConfig.k=9 is invalid"):
        RouterConfig(kind="sparsemixer", k=9).validate(8)
    assert RouterConfig(kind="sparsemixer").hf_routing() is None
