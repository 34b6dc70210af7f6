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


def test_layer_with_topp_matches_reference_and_reports_stats(make_cfg):
    layer = moekit.MoELayer(make_cfg(kind="topp", p=0.5, num_experts=8))
    ref = moekit.MoELayer(make_cfg(kind="topp", p=0.5, num_experts=8, backend="reference"))
    ref.load_state_dict(layer.state_dict())
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
    with pytest.raises(ValueError, match=r"score='sigmoid' is invalid for kind='topp'"):
        moekit.RouterConfig(kind="topp", score="sigmoid").validate(8)
