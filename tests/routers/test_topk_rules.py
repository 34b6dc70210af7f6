"""Top-k rule settings of pretrained families, each against a transcription of the family's router forward
(transformers 5.x): the group scored by its best two softmax scores (Mistral 4), the selection bias on the
logits (Kolibri-1), p-norm renormalisation (DBRX), the clamp-floored denominator (ERNIE 4.5), sqrt-softplus
scores (DeepSeek-V4)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from moekit.config import RouterConfig
from moekit.routers import router_class

E, D, T = 8, 16, 256


def _router(**fields):
    cfg = RouterConfig(kind="topk", **fields)
    router = router_class("topk")(cfg, D, E)
    router.eval()
    return router


def _same(router, x_TD, w_ref_TK, idx_ref_TK):
    idx_TK, w_TK = router(x_TD).to_padded()
    order, ref_order = idx_TK.argsort(-1), idx_ref_TK.argsort(-1)
    assert torch.equal(idx_TK.gather(1, order), idx_ref_TK.gather(1, ref_order))
    torch.testing.assert_close(w_TK.gather(1, order), w_ref_TK.gather(1, ref_order), rtol=1e-6, atol=1e-7)


def _with_weight(router, **changes):
    """A router of `router`'s kind with fields changed, on the same gate."""
    cfg = dataclasses.replace(router.cfg, **changes)
    other = router_class("topk")(cfg, D, E).eval()
    other.weight = router.weight
    return other


def _x(seed=0):
    return torch.randn(T, D, generator=torch.Generator().manual_seed(seed))


def test_group_score_top2_sum_on_softmax_is_mistral4():
    torch.manual_seed(0)
    router = _router(k=2, score="softmax", normalize=True, n_group=2, topk_group=1, group_score="top2_sum",
                     routed_scaling_factor=1.5)
    x = _x()
    # Mistral4TopkRouter.forward, transcribed.
    router_logits = F.linear(x, router.weight)
    scores = router_logits.softmax(-1)
    group_scores = scores.view(-1, 2, E // 2).topk(2, dim=-1)[0].sum(dim=-1)
    group_idx = torch.topk(group_scores, k=1, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
    score_mask = group_mask.unsqueeze(-1).expand(-1, 2, E // 2).reshape(-1, E)
    topk_indices = torch.topk(scores.masked_fill(~score_mask.bool(), 0.0), k=2, dim=-1, sorted=False)[1]
    topk_weights = scores.gather(1, topk_indices)
    topk_weights = topk_weights / (topk_weights.sum(dim=-1, keepdim=True) + 1e-20) * 1.5
    _same(router, x, topk_weights, topk_indices)
    # The softmax default (a group's best expert, DeepSeek-V2) picks other experts for some of these tokens.
    idx_max, _ = _with_weight(router, group_score=None)(x).to_padded()
    assert not torch.equal(idx_max.sort(-1).values, topk_indices.sort(-1).values)


def test_selection_bias_on_logits_is_kolibri1():
    torch.manual_seed(1)
    router = _router(k=2, score="sigmoid", normalize=True, selection_bias_on="logits")
    with torch.no_grad():
        router.e_score_correction_bias.copy_(0.5 * torch.randn(E))
    x = _x(1)
    # Kolibri1TopKRouter.forward, transcribed.
    router_logits = F.linear(x, router.weight)
    router_indices = torch.topk(router_logits + router.e_score_correction_bias, 2, dim=-1)[1]
    router_scores = router_logits.gather(1, router_indices).sigmoid()
    router_scores = router_scores / router_scores.sum(dim=-1, keepdim=True)
    _same(router, x, router_scores, router_indices)
    on_scores = _with_weight(router, selection_bias_on="scores")
    on_scores.e_score_correction_bias = router.e_score_correction_bias
    assert not torch.equal(on_scores(x).to_padded()[0].sort(-1).values, router_indices.sort(-1).values)


@pytest.mark.parametrize("p", [2.0, 0.5])
def test_normalize_p_is_dbrx(p):
    torch.manual_seed(2)
    router = _router(k=3, score="softmax", normalize=True, normalize_p=p)
    x = _x(2)
    # DbrxFFN.route_tokens_to_experts, transcribed.
    router_logits = torch.softmax(F.linear(x, router.weight), dim=1)
    router_top_value, router_indices = torch.topk(router_logits, 3, dim=-1)
    router_top_value = router_top_value / torch.norm(router_top_value, p=p, dim=-1, keepdim=True)
    _same(router, x, router_top_value, router_indices)


def test_normalize_min_is_ernie45():
    torch.manual_seed(3)
    router = _router(k=2, score="softmax", normalize=True, normalize_min=0.5)
    with torch.no_grad():
        router.e_score_correction_bias.copy_(0.05 * torch.randn(E))
    x = _x(3)
    # Ernie4_5_MoeTopKRouter.forward, transcribed (moe_statics adds the bias to the probabilities).
    routing_weights = F.softmax(F.linear(x, router.weight), dim=1, dtype=torch.float)
    _, selected = torch.topk(routing_weights + router.e_score_correction_bias, 2, dim=-1)
    routing_weights = torch.gather(routing_weights, dim=-1, index=selected)
    sums = routing_weights.sum(dim=-1, keepdim=True)
    assert bool((sums < 0.5).any()) and bool((sums > 0.5).any())  # the floor decides for some tokens only
    _same(router, x, routing_weights / torch.clamp(sums, min=0.5), selected)


def test_sqrtsoftplus_is_deepseek_v4():
    torch.manual_seed(4)
    router = _router(k=2, score="sqrtsoftplus", normalize=True, routed_scaling_factor=1.5)
    with torch.no_grad():
        router.e_score_correction_bias.copy_(0.3 * torch.randn(E))
    x = _x(4)
    # DeepseekV4TopKRouter.forward, transcribed.
    logits = F.linear(x, router.weight)
    scores = F.softplus(logits).sqrt()
    indices = torch.topk(scores + router.e_score_correction_bias, 2, dim=-1, sorted=False).indices
    weights = scores.gather(1, indices)
    weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    _same(router, x, weights * 1.5, indices)


def test_settings_are_validated_and_export_refuses_rules_it_cannot_write():
    for field, value, allowed in (("group_score", "mean", "None or one of"), ("normalize_p", 0.0, "a float > 0"),
                                  ("normalize_min", -1.0, "a float >= 0"), ("selection_bias_on", "x", "one of"),
                                  ("score", "tanh", "one of")):
        with pytest.raises(ValueError, match=rf"RouterConfig.{field}=.* is invalid; allowed: {allowed}"):
            RouterConfig(kind="topk", **{field: value}).validate(E)
    with pytest.raises(ValueError, match="group_score='top2_sum'"):
        RouterConfig(kind="topk", k=2, n_group=8, topk_group=2, group_score="top2_sum").validate(E)
    assert RouterConfig(kind="topk", score="sigmoid", n_group=2, group_score="top2_sum").hf_routing() is not None
    for fields in (dict(score="sqrtsoftplus"), dict(normalize_p=2.0), dict(normalize_min=0.1),
                   dict(selection_bias_on="logits"), dict(n_group=2, group_score="top2_sum")):
        assert RouterConfig(kind="topk", **fields).hf_routing() is None, fields
