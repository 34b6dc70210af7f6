"""Top-k router family: selection rules, weights, groups, bias."""

import pytest
import torch

import moekit
from moekit.routers.expert_choice import ExpertChoiceRouter
from moekit.routers.topk import TopKRouter


def make_router(E=8, D=16, **kw):
    cfg = moekit.RouterConfig(**kw).validate(E)
    return TopKRouter(cfg, D, E)


def test_softmax_topk_renormalised_equals_softmax_over_topk_logits():
    r = make_router(k=3, normalize=True)
    x = torch.randn(10, 16)
    out = r(x)
    idx_TK, w_TK = out.to_padded()
    logits = out.logits_TE
    # algorithms.md §0: softmax over the top-k logits == renormalised top-k of the full softmax
    expected = torch.softmax(logits.gather(1, idx_TK), dim=-1)
    torch.testing.assert_close(w_TK, expected)
    # and the chosen experts are the k largest logits
    top = torch.topk(logits, 3).indices.sort(-1).values
    assert torch.equal(idx_TK.sort(-1).values, top)


def test_unnormalised_weights_are_raw_probabilities():
    r = make_router(k=2, normalize=False)
    out = r(torch.randn(6, 16))
    idx, w = out.to_padded()
    torch.testing.assert_close(w, out.scores_TE.gather(1, idx))
    assert bool((w.sum(-1) < 1).all())


def test_gate_math_is_fp32_for_bf16_input():
    r = make_router(k=2).to(torch.bfloat16)
    out = r(torch.randn(5, 16, dtype=torch.bfloat16))
    assert out.scores_TE.dtype == torch.float32 and out.logits_TE.dtype == torch.float32
    assert out.weight_N.dtype == torch.float32


def test_sigmoid_scaling_and_normalisation():
    r = make_router(k=2, score="sigmoid", normalize=True, routed_scaling_factor=2.5)
    out = r(torch.randn(7, 16))
    _, w = out.to_padded()
    torch.testing.assert_close(w.sum(-1), torch.full((7,), 2.5))


def test_bias_changes_selection_not_weights():
    r = make_router(k=2, score="sigmoid", normalize=False, bias_update_rate=1e-3)
    x = torch.randn(20, 16)
    before = r(x)
    r.e_score_correction_bias[3] = 10.0  # force expert 3 into every selection
    after = r(x)
    idx, w = after.to_padded()
    assert bool((idx == 3).any(-1).all())
    # weights are the unbiased sigmoid scores of the chosen experts
    torch.testing.assert_close(w, torch.sigmoid(after.logits_TE).gather(1, idx))
    torch.testing.assert_close(before.scores_TE, after.scores_TE)


def test_group_limited_selection_stays_in_topk_groups():
    E, G, TG = 16, 4, 2
    r = make_router(E=E, k=4, score="sigmoid", n_group=G, topk_group=TG)
    out = r(torch.randn(50, 16))
    idx, _ = out.to_padded()
    groups = idx // (E // G)
    for row in groups:
        assert len(set(row.tolist())) <= TG
    # the kept groups are those with the largest sum of their top-2 scores
    s = out.scores_TE.view(50, G, E // G)
    gscore = s.topk(2, dim=-1).values.sum(-1)
    best = gscore.topk(TG, dim=-1).indices
    for row, b in zip(groups, best, strict=True):
        assert set(row.tolist()) <= set(b.tolist())


def test_softmax_groups_use_max_score():
    E, G = 8, 4
    r = make_router(E=E, k=2, score="softmax", n_group=G, topk_group=1)
    out = r(torch.randn(30, 16))
    idx, _ = out.to_padded()
    best_group = out.scores_TE.view(30, G, 2).max(-1).values.argmax(-1)
    assert torch.equal(idx // 2, best_group.unsqueeze(-1).expand(-1, 2))


def test_bias_update_sign_rule_and_recentre():
    r = make_router(E=4, k=1, bias_update_rate=0.1)
    r.update_bias(torch.tensor([10, 0, 5, 5]))
    torch.testing.assert_close(r.e_score_correction_bias, torch.tensor([-0.1, 0.1, 0.0, 0.0]))
    r2 = make_router(E=4, k=1, bias_update_rate=0.1, bias_recenter=True)
    r2.update_bias(torch.tensor([10, 0, 0, 0]))
    assert abs(float(r2.e_score_correction_bias.sum())) < 1e-6
    r3 = make_router(E=4, k=1)  # gamma = 0: no update
    r3.update_bias(torch.tensor([10, 0, 0, 0]))
    assert not r3.e_score_correction_bias.any()


def test_jitter_only_in_training():
    r = make_router(k=2, jitter=0.5)
    x = torch.randn(8, 16)
    r.eval()
    torch.testing.assert_close(r(x).logits_TE, r(x).logits_TE)
    r.train()
    assert not torch.allclose(r(x).logits_TE, r(x).logits_TE)


def test_expert_choice_each_expert_takes_capacity_tokens():
    E, T = 4, 10
    cfg = moekit.RouterConfig(kind="expert_choice", ec_capacity_factor=2.0).validate(E)
    r = ExpertChoiceRouter(cfg, 16, E)
    out = r(torch.randn(T, 16))
    C = round(2.0 * T / E)
    assert torch.equal(out.counts_E(), torch.full((E,), C))
    # each expert's tokens are its top-C by score
    for e in range(E):
        toks = out.token_idx_N[out.expert_idx_N == e]
        assert set(toks.tolist()) == set(out.scores_TE[:, e].topk(C).indices.tolist())
    assert not ExpertChoiceRouter.is_causal
    assert int(out.experts_per_token_T().max()) <= E


def test_to_padded_roundtrip_with_ragged_counts():
    out = moekit.RouterOutput(
        token_idx_N=torch.tensor([0, 2, 2, 2, 0]), expert_idx_N=torch.tensor([1, 0, 3, 2, 3]),
        weight_N=torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5]), scores_TE=torch.zeros(3, 4), logits_TE=torch.zeros(3, 4))
    idx, w = out.to_padded()
    assert idx.tolist() == [[1, 3, -1], [-1, -1, -1], [0, 3, 2]]
    torch.testing.assert_close(w, torch.tensor([[0.1, 0.5, 0.0], [0.0, 0.0, 0.0], [0.2, 0.3, 0.4]]))
    assert out.experts_per_token_T().tolist() == [2, 0, 3]


@pytest.mark.parametrize("name", ["topk", "expert_choice"])
def test_registry(name):
    assert name in moekit.registered_routers()
    with pytest.raises(ValueError, match="already registered"):
        moekit.register(name)(TopKRouter)
