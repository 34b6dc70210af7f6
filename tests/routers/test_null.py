"""Null experts (AdaMoE, arXiv 2406.13233): zero FLOPs, zero output, the paper's balance loss."""

import pytest
import torch

import moekit
from moekit import losses
from moekit.routers.null import NullExpertRouter


def null_layer(make_cfg, **kw):
    return moekit.MoELayer(make_cfg(kind="null", n_null=4, k=2, num_experts=4, num_shared_experts=1, **kw))


def test_null_rows_start_as_tiled_copies_and_pretrained_gate_is_shared():
    cfg = moekit.RouterConfig(kind="null", n_null=5, k=2).validate(3)
    r = NullExpertRouter(cfg, 8, 3)
    assert torch.equal(r.null_weight, r.weight[torch.tensor([0, 1, 2, 0, 1])])
    assert r.weight.shape == (3, 8)  # the real gate keeps its own shape (a pretrained Parameter fits)


def test_tokens_routed_only_to_null_get_shared_output_only(make_cfg):
    layer = null_layer(make_cfg)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.null_weight.zero_()
        layer.router.null_weight[:, 0] = 100.0  # tokens with x[0] > 0 pick only null experts
    x = torch.randn(6, 32)
    x[:3, 0] = 1.0
    x[3:, 0] = -1.0
    y = layer(x)
    info = layer.routing_info()
    shared = layer.shared_experts(x)
    torch.testing.assert_close(y[:3], shared[:3])  # zero MoE output, no NaN
    assert set(info.route.token_idx_N.tolist()) == {3, 4, 5}
    assert info.num_null == 6 and info.stats()["null_rate"] == pytest.approx(0.5)
    assert not torch.isnan(y).any()


def test_null_picks_cost_no_flops(make_cfg):
    layer = null_layer(make_cfg)
    x = torch.randn(40, 32)
    layer(x)
    info = layer.routing_info()
    # only real picks reach dispatch: executed rows = real assignments, fewer than T*k
    assert int(info.counts_E.sum()) == info.route.num_assignments == 80 - info.num_null
    assert int(info.route.expert_idx_N.max()) < 4


def test_weights_renormalised_over_real_experts(make_cfg):
    layer = null_layer(make_cfg)
    layer(torch.randn(30, 32))
    r = layer.routing_info().route
    sums = torch.zeros(30).index_add(0, r.token_idx_N, r.weight_N)
    has_real = r.experts_per_token_T() > 0
    torch.testing.assert_close(sums[has_real], torch.ones(int(has_real.sum())))


def test_balance_loss_replaces_null_counts_by_their_mean(make_cfg):
    layer = null_layer(make_cfg)
    x = torch.randn(25, 32)
    layer(x)
    info = layer.routing_info()
    r = info.route
    E, M, k, T = 4, 4, 2, 25
    null_total = k * T - r.num_assignments
    counts = torch.cat([r.counts_E().float(), torch.full((M,), null_total / M)])
    probs = torch.cat([r.scores_TE, r.extras.null_scores_TM], -1)
    torch.testing.assert_close(info.aux["load_balance"].detach(), losses.load_balance_loss(probs, counts, T))
    # at balance the expected number of real experts per token is k*E/(E+M)
    assert layer.cfg.expected_experts_per_token() == pytest.approx(k * E / (E + M))


def test_null_layer_matches_reference_backend(make_cfg, reference_twin):
    a = null_layer(make_cfg)
    b = reference_twin(a)
    x = torch.randn(2, 9, 32)
    torch.testing.assert_close(a(x), b(x))


def test_null_config_errors():
    with pytest.raises(ValueError, match="n_null=0 is invalid for kind='null'"):
        moekit.RouterConfig(kind="null", n_null=0).validate(4)
    with pytest.raises(ValueError, match=r"num_experts \+ n_null = 6"):
        moekit.RouterConfig(kind="null", n_null=2, k=7).validate(4)


def adamoe_weights(logits_TX: torch.Tensor, E: int, k: int) -> torch.Tensor:
    """CengZihao/AdaMoE `CustomMixtralSparseMoeBlock` (transcribed): the top-k weights of the real picks
    divided by their sum, an exact zero sum replaced by 1; null picks keep their raw weight (unused)."""
    w_TK, idx_TK = torch.topk(torch.softmax(logits_TX, dim=-1), k, dim=-1)
    real = idx_TK < E
    selected = w_TK * real.float()
    total = selected.sum(dim=-1, keepdim=True)
    total[total == 0] = 1
    return torch.zeros_like(logits_TX).scatter(1, idx_TK, selected / total)[:, :E]


def null_router(E, M, k):
    return NullExpertRouter(moekit.RouterConfig(kind="null", n_null=M, k=k).validate(E), 8, E)


def dense_weights(route) -> torch.Tensor:
    w = torch.zeros(route.num_tokens, route.num_experts)
    return w.index_put((route.token_idx_N, route.expert_idx_N), route.weight_N.detach(), accumulate=True)


def test_a_tiny_real_share_is_renormalised_to_one_without_clamping():
    """E = 1 real, M = 1 null, k = 2, logits [-50, 0]: the real expert's weight is 1.0 (a 1e-20 clamp gave 0.0193)."""
    route = null_router(1, 1, 2).select(torch.tensor([[-50.0, 0.0]]), torch.zeros(1, 8))
    torch.testing.assert_close(route.weight_N, torch.tensor([1.0]))


def test_weights_equal_the_authors_code():
    g = torch.Generator().manual_seed(0)
    E, M, k = 4, 2, 3
    logits = 6 * torch.randn(200, E + M, generator=g)
    logits[:20, :E] -= 60  # real experts far behind: each of these tokens gets one real pick of tiny share
    route = null_router(E, M, k).select(logits, torch.zeros(200, 8))
    torch.testing.assert_close(dense_weights(route), adamoe_weights(logits, E, k), rtol=1e-6, atol=0)


def test_k1_keeps_the_raw_probability_and_trains_the_gate(make_cfg):
    route = null_router(2, 2, 1).select(torch.tensor([[2.0, 0.0, 0.0, 0.0]]), torch.zeros(1, 8))
    torch.testing.assert_close(route.weight_N, torch.softmax(torch.tensor([2.0, 0.0, 0.0, 0.0]), 0)[:1])
    layer = moekit.MoELayer(make_cfg(kind="null", n_null=2, k=1))
    x = torch.randn(16, 32)
    layer(x).pow(2).sum().backward()  # the task loss alone
    assert layer.router.weight.grad.abs().max() > 1e-3


def test_a_reroute_of_n_null_the_null_rows_cannot_follow_is_refused():
    # Before: route(n_null=8) on a null router built with 4 null rows was accepted; the layer ran with 4 null
    # logits and a config saying 8.
    cfg = moekit.MoEConfig(d_model=16, d_expert=8, num_experts=6, router=moekit.RouterConfig(kind="null", n_null=4, k=2))
    layer = moekit.MoELayer(cfg).eval()
    with pytest.raises(ValueError, match=r"route\(\): RouterConfig\(kind='null'\) n_null=8: the router holds 4 null "
                                         r"rows \(null_weight\); expected n_null=4, the rows it holds"):
        moekit.route(layer, n_null=8)
    with moekit.route(layer, k=3):  # a field read at every forward is honoured
        with torch.no_grad():
            layer(torch.randn(5, 16))
        assert layer.router.cfg.k == 3
