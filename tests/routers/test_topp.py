"""Top-p router (arXiv 2403.07652): hand-checked cases, minimality, caps, loss."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moekit
from moekit.routers.topp import TopPRouter


def route_probs(P_TE, **kw):
    """Route tokens whose softmax equals P_TE exactly (logits = log P)."""
    E = P_TE.shape[-1]
    cfg = moekit.RouterConfig(kind="topp", **kw).validate(E)
    r = TopPRouter(cfg, 4, E)
    return r.select(torch.log(P_TE), torch.zeros(P_TE.shape[0], 4))


@pytest.mark.parametrize("P,p,n", [
    ([1 / 16] * 16, 0.4, 7),             # uniform: 7 experts, weight sum 0.4375
    ([0.5, 0.3, 0.2], 0.4, 1),           # max P > p: exactly one expert
    ([0.4, 0.35, 0.25], 0.4, 2),         # a cumulative mass equal to p does not stop the selection
    ([0.25, 0.25, 0.25, 0.25], 1.0, 4),  # p = 1 selects everything
])
def test_hand_checked_cases(P, p, n):
    out = route_probs(torch.tensor([P]), p=p)
    assert out.num_assignments == n
    if len(P) == 16:
        torch.testing.assert_close(out.weight_N.sum(), torch.tensor(0.4375))


def test_weights_are_raw_probabilities_unless_normalised():
    P = torch.tensor([[0.3, 0.3, 0.2, 0.2]])
    raw = route_probs(P, p=0.5)
    torch.testing.assert_close(raw.weight_N, torch.tensor([0.3, 0.3]))
    norm = route_probs(P, p=0.5, normalize=True)
    torch.testing.assert_close(norm.weight_N, torch.tensor([0.5, 0.5]))


def test_ties_are_deterministic_lower_expert_first():
    out = route_probs(torch.full((1, 8), 1 / 8), p=0.2)
    assert sorted(out.expert_idx_N.tolist()) == [0, 1]


def test_min_and_max_k():
    P = torch.full((3, 16), 1 / 16)
    assert route_probs(P, p=0.4, max_k=3).experts_per_token_T().tolist() == [3, 3, 3]
    peaked = torch.tensor([[0.9] + [0.1 / 15] * 15])
    assert route_probs(peaked, p=0.4, min_k=2).num_assignments == 2


@settings(max_examples=60, deadline=None)
@given(T=st.integers(1, 20), E=st.integers(1, 32), p=st.floats(0.05, 1.0), seed=st.integers(0, 10_000),
       cap=st.one_of(st.none(), st.integers(1, 32)))
def test_property_minimal_prefix(T, E, p, seed, cap):
    max_k = None if cap is None else min(cap, E)
    g = torch.Generator().manual_seed(seed)
    P = torch.softmax(3 * torch.randn(T, E, generator=g), -1)
    out = route_probs(P, p=p, max_k=max_k)
    per_token = out.experts_per_token_T()
    assert bool((per_token >= 1).all())
    if max_k is not None:
        assert bool((per_token <= max_k).all())
    idx_TK, w_TK = out.to_padded()
    for t in range(T):
        chosen = idx_TK[t][idx_TK[t] >= 0]
        mass = P[t, chosen].sum()
        # the chosen experts are the most probable ones
        assert P[t, chosen].min() >= P[t].sort(descending=True).values[len(chosen) - 1] - 1e-7
        capped = max_k is not None and len(chosen) == max_k
        if not capped:
            assert mass > p - 1e-6 or len(chosen) == E
        if len(chosen) > 1:  # minimality: removing the last chosen expert drops the mass to <= p
            assert mass - P[t, chosen].min() <= p + 1e-6


def test_layer_with_topp_matches_reference_and_reports_stats(make_cfg, reference_twin):
    layer = moekit.MoELayer(make_cfg(kind="topp", p=0.5, num_experts=8))
    ref = reference_twin(layer)
    x = torch.randn(2, 12, 32)
    torch.testing.assert_close(layer(x), ref(x))
    info = layer.routing_info()
    s = info.stats()
    assert s["experts_per_token_mean"] == pytest.approx(info.route.num_assignments / 24)
    assert sum(s["experts_per_token_hist"]) == 24
    dyn = info.aux["dynamic"]
    expected = torch.special.entr(info.route.scores_TE).sum(-1).mean()
    torch.testing.assert_close(dyn.detach(), expected)
    assert dyn.requires_grad


def test_dynamic_loss_max_for_uniform_router():
    out = route_probs(torch.full((2, 8), 1 / 8), p=0.4)
    r = TopPRouter(moekit.RouterConfig(kind="topp").validate(8), 4, 8)
    torch.testing.assert_close(r.aux_losses(out, None)["dynamic"], torch.tensor(math.log(8)))


def test_topp_config_errors():
    with pytest.raises(ValueError, match=r"RouterConfig.p=1.5 .*\(0, 1\]"):
        moekit.RouterConfig(kind="topp", p=1.5).validate(8)
    with pytest.raises(ValueError, match=r"RouterConfig.max_k=9"):
        moekit.RouterConfig(kind="topp", max_k=9).validate(8)
    with pytest.raises(ValueError, match=r"RouterConfig.score='tanh' is invalid"):
        moekit.RouterConfig(kind="topp", score="tanh").validate(8)
    moekit.RouterConfig(kind="topp", score="sigmoid").validate(8)  # mass over normalised sigmoid affinities


# --------------------------------------------------- the selection boundary of the authors' code (issue 11, item 1)
def reference_topp_sets(P_TE: torch.Tensor, p: float) -> list[set[int]]:
    """ZhenweiAn/Dynamic_MoE `top_p_sampling_batched_all_sequence` (on probabilities), transcribed: keep the
    sorted experts up to and including the first whose cumulative probability is > p."""
    sorted_probs, sorted_indices = torch.sort(P_TE, descending=True)
    mask = torch.cumsum(sorted_probs, dim=-1) > p
    threshold = mask.long().argmax(dim=-1)
    mask = mask & ~torch.nn.functional.one_hot(threshold, num_classes=P_TE.shape[-1]).bool()
    return [set(sorted_indices[t][~mask[t]].tolist()) for t in range(P_TE.shape[0])]


def chosen_sets(route) -> list[set[int]]:
    idx_TK, _ = route.to_padded()
    return [set(row[row >= 0].tolist()) for row in idx_TK]


def select_logits(logits, **kw):
    E = len(logits[0])
    r = TopPRouter(moekit.RouterConfig(kind="topp", **kw).validate(E), 4, E)
    return r.select(torch.tensor(logits), torch.zeros(len(logits), 4))


def test_a_cumulative_mass_equal_to_p_takes_the_next_expert():
    # P = [0.4, 0.3, 0.3] exactly in fp32; the mass before slot 1 is 0.4 <= p, so the reference takes 2
    # (c_1 - P_1 = 0.7f - 0.3f rounds above 0.4 and took 1).
    route = select_logits([[0.28768203, 0.0, 0.0]], p=0.4)
    assert torch.softmax(route.logits_TE, -1)[0, 0].item() == torch.tensor(0.4).item()
    assert chosen_sets(route) == [{0, 1}]


def test_p_one_selects_every_expert():
    route = select_logits([[4.5, 1.0, 7.5, 2.75, -4.25, 2.5, 0.25, -9.25]], p=1.0)
    assert route.num_assignments == 8  # c_7 - P_7 rounds above 1.0 and dropped the last expert
    g = torch.Generator().manual_seed(0)
    logits = 8 * torch.randn(200, 32, generator=g)
    r = TopPRouter(moekit.RouterConfig(kind="topp", p=1.0).validate(32), 4, 32)
    assert r.select(logits, torch.zeros(200, 4)).num_assignments == 200 * 32


@pytest.mark.parametrize("seed", range(4))
def test_selection_equals_the_reference_code(seed):
    g = torch.Generator().manual_seed(seed)
    T, E = 64, 16
    logits = (1 + 3 * seed) * torch.randn(T, E, generator=g)
    P = torch.softmax(logits, -1)
    r = TopPRouter(moekit.RouterConfig(kind="topp").validate(E), 4, E)
    for p in (0.1, 0.4, 0.9, 0.999):  # (at p = 1 fp32 sums above 1 make the reference drop experts; moekit keeps all)
        r.cfg.p = p
        assert chosen_sets(r.select(logits, torch.zeros(T, 4))) == reference_topp_sets(P, p)
    # p exactly at a cumulative mass, where the two ways of computing the mass before a slot disagree
    c = torch.sort(P, descending=True).values.cumsum(-1)
    for t in range(T):
        for j in range(E - 1):
            if c[t, j] >= 1:
                break
            r.cfg.p = float(c[t, j])
            assert chosen_sets(r.select(logits[t:t + 1], torch.zeros(1, 4))) == reference_topp_sets(P[t:t + 1], r.cfg.p)


def test_recurrent_override_and_masks_use_the_same_rule(make_cfg):
    # recurrent routers select with the same function on the GRU's logits
    layer = moekit.MoELayer(make_cfg(kind="recurrent", select_rule="topp", p=0.4, gru_dim=8, num_experts=8))
    gru = torch.nn.GRUCell(8, 8)
    layer(torch.randn(40, 32), router_state=moekit.RecurrentState(gru))
    route = layer.routing_info().route
    assert chosen_sets(route) == reference_topp_sets(route.scores_TE, 0.4)
    # moekit.route(kind="topp") on a top-k layer whose logits are the values
    topk = moekit.MoELayer(make_cfg(num_experts=4, k=1)).eval()
    with torch.no_grad():
        topk.router.weight.zero_()
        topk.router.weight[:3, 0] = torch.tensor([0.28768203, 0.0, 0.0])
        topk.router.weight[3, 0] = -1.0
    x = torch.zeros(1, 32)
    x[0, 0] = 1.0
    with moekit.route(topk, kind="topp", p=0.4):
        topk(x)
        assert chosen_sets(topk.routing_info().route) == [{0, 1}]
    # a disabled expert leaves P = [0.4, 0.3, 0.3, 0]: still two experts
    with torch.no_grad():
        topk.router.weight[3, 0] = 5.0
    with moekit.route(topk, kind="topp", p=0.4), moekit.mask_experts(topk, disabled={0: [3]}):
        topk(x)
        assert chosen_sets(topk.routing_info().route) == [{0, 1}]
