"""Expert masks (MoTE, arXiv 2502.11096): disabled -> logit -inf, forced -> +inf, before selection."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import moekit
from moekit.routers.null import NullExpertRouter
from moekit.routers.topk import TopKRouter
from moekit.routers.topp import TopPRouter

E, D, T = 8, 16, 64


def _model(**router_kw) -> nn.Module:
    """Two MoE layers routed by `router_kw`, of which the fields the kind has (k=2, n_null=2 for any kind)."""
    fields = {f.name for f in dataclasses.fields(moekit.RouterConfig(kind=router_kw.get("kind", "topk")))}
    router = moekit.RouterConfig(**{k: v for k, v in router_kw.items() if k in fields})
    cfg = moekit.MoEConfig(d_model=D, d_expert=32, num_experts=E, router=router)
    return nn.Sequential(moekit.MoELayer(cfg), moekit.MoELayer(cfg))


def _x(seed: int = 0) -> torch.Tensor:
    return torch.randn(T, D, generator=torch.Generator().manual_seed(seed))


def _picks(layer) -> torch.Tensor:
    return layer.routing_info().route.to_padded()[0]


# ------------------------------------------------------------------------------------- top-k
def test_topk_disabled_is_logit_minus_inf():
    model = _model(kind="topk", k=2, normalize=False)
    x = _x()
    layer = model[0]
    with torch.no_grad():
        layer(x)
        busiest = int(layer.routing_info().counts_E.argmax())
        with moekit.mask_experts(model, disabled={0: [busiest, 0]}):
            layer(x)
            route = layer.routing_info().route
    assert not ((route.expert_idx_N == busiest) | (route.expert_idx_N == 0)).any()
    assert (route.experts_per_token_T() == 2).all()
    # The rule: the same as a softmax over logits with -inf at the disabled experts.
    logits = torch.nn.functional.linear(x, layer.router.weight)
    logits[:, [busiest, 0]] = float("-inf")
    P = torch.softmax(logits, -1)
    top = torch.topk(P, 2, -1)
    idx, w = route.to_padded()
    order = idx.argsort(-1)
    torch.testing.assert_close(idx.gather(1, order), top.indices.gather(1, top.indices.argsort(-1)))
    torch.testing.assert_close(w.gather(1, order), top.values.gather(1, top.indices.argsort(-1)))
    torch.testing.assert_close(route.scores_TE[:, busiest], torch.zeros(T))


def test_topk_forced_takes_a_slot_with_its_own_weight():
    model = _model(kind="topk", k=2, normalize=False)
    layer = model[1]
    x = _x()
    with torch.no_grad(), moekit.mask_experts(model, forced={1: [3]}):
        layer(x)
    route = layer.routing_info().route
    idx, w = route.to_padded()
    assert (idx == 3).any(-1).all() and idx.shape == (T, 2)  # forced in, still k=2 per token
    torch.testing.assert_close(w, route.scores_TE.gather(1, idx))  # unforced weights
    # The other slot is each token's best remaining expert.
    others = route.scores_TE.clone()
    others[:, 3] = -1
    other_idx = torch.where(idx[:, 0] == 3, idx[:, 1], idx[:, 0])
    assert torch.equal(other_idx, others.argmax(-1))


def test_forced_and_disabled_apply_to_biased_sigmoid_scores_with_groups():
    """DeepSeek-V3: the mask acts on scores + bias, before the group limit."""
    cfg = moekit.RouterConfig(kind="topk", k=2, score="sigmoid", normalize=True, routed_scaling_factor=2.5,
                              n_group=4, topk_group=2).validate(E)
    router = TopKRouter(cfg, D, E)
    with torch.no_grad():
        router.e_score_correction_bias[6] = 10.0  # the bias alone puts expert 6 in every selection
    x = _x()
    assert (router(x).to_padded()[0] == 6).any(-1).all()
    model = nn.Sequential(moekit.MoELayer(moekit.MoEConfig(d_model=D, d_expert=8, num_experts=E, router=cfg)))
    model[0].router = router
    with moekit.mask_experts(model, disabled={0: [6]}, forced={0: [1]}):
        route = router(x)
    idx, w = route.to_padded()
    assert not (idx == 6).any() and (idx == 1).any(-1).all()
    torch.testing.assert_close(w.sum(-1), torch.full((T,), 2.5))  # unbiased scores, normalised, scaled
    # Reference: transformers' DeepSeek-V3 router with the mask written into its biased scores.
    scores = torch.sigmoid(torch.nn.functional.linear(x, router.weight))
    choice = scores + router.e_score_correction_bias
    choice[:, 6], choice[:, 1] = float("-inf"), float("inf")
    group = choice.view(T, 4, 2).topk(2, dim=-1).values.sum(-1)
    keep = torch.zeros(T, 4, dtype=torch.bool).scatter_(1, group.topk(2, dim=-1).indices, True)
    want = choice.masked_fill(~keep.repeat_interleave(2, dim=1), float("-inf")).topk(2, dim=-1).indices
    assert torch.equal(idx.sort(-1).values, want.sort(-1).values)


# -------------------------------------------------------------------------------- top-p, null
def test_topp_disabled_experts_never_selected():
    model = _model(kind="topp", p=0.7)
    layer = model[0]
    x = _x()
    with torch.no_grad():
        layer(x)
        before = layer.routing_info().route
        with moekit.mask_experts(model, disabled={0: [0, 1, 2]}):
            layer(x)
            after = layer.routing_info().route
    assert (before.expert_idx_N < 3).any() and not (after.expert_idx_N < 3).any()
    torch.testing.assert_close(after.scores_TE[:, :3], torch.zeros(T, 3))
    torch.testing.assert_close(after.scores_TE.sum(-1), torch.ones(T))  # renormalised over the rest


def test_a_rule_that_still_picks_a_disabled_expert_does_not_run_it():
    """min_k = E makes top-p pick every expert, zero-probability ones included: the base drops those
    picks (weight 0 anyway), so a disabled expert never runs. (mask_experts refuses this config; the
    router-level safety net is tested by setting the mask directly.)"""
    router = TopPRouter(moekit.RouterConfig(kind="topp", p=0.5, min_k=E).validate(E), D, E)
    assert router(_x()).num_assignments == T * E
    router.expert_mask_E = torch.tensor([-1, 0, 0, 0, 0, 0, 0, -1], dtype=torch.int8)
    route = router(_x())
    assert not ((route.expert_idx_N == 0) | (route.expert_idx_N == 7)).any()
    assert (route.experts_per_token_T() == E - 2).all()


def test_null_router_disabled_real_experts():
    cfg = moekit.RouterConfig(kind="null", k=3, n_null=4).validate(E)
    model = nn.Sequential(moekit.MoELayer(moekit.MoEConfig(d_model=D, d_expert=8, num_experts=E, router=cfg)))
    assert isinstance(model[0].router, NullExpertRouter)
    x = _x()
    with torch.no_grad(), moekit.mask_experts(model, disabled={0: list(range(6))}):
        model[0](x)
        info = model[0].routing_info()
    assert info.route.num_assignments > 0 and bool((info.route.expert_idx_N >= 6).all())
    assert info.route.extras.null_scores_TM.shape == (T, 4) and info.num_null > 0  # null experts are never masked


@pytest.mark.parametrize("kind", ["topp", "null"])
def test_forced_joins_every_token_for_topp_and_null(kind):
    model = _model(kind=kind, k=2, n_null=2)
    x = _x()
    with torch.no_grad():
        model[0](x)
        before = model[0].routing_info().route
        with moekit.mask_experts(model, forced={0: [1]}):
            model[0](x)
            route = model[0].routing_info().route
    tokens_with_1 = torch.zeros(route.num_tokens, dtype=torch.bool)
    tokens_with_1[route.token_idx_N[route.expert_idx_N == 1]] = True
    assert tokens_with_1.all()
    assert (before.expert_idx_N == 1).sum() < before.num_tokens  # without the mask, some tokens skip expert 1
    # the forced expert's weight is its own probability, not a made-up one
    w1 = route.weight_N[route.expert_idx_N == 1]
    assert bool((w1 > 0).all()) and bool((w1 <= 1).all())
    assert model[0].router.expert_mask_E is None


@pytest.mark.parametrize("kind", ["random", "expert_choice"])
def test_forced_is_refused_where_the_rule_cannot_rank_it(kind):
    model = _model(kind=kind, k=2, n_null=2)
    with pytest.raises(ValueError, match=f"router kind '{kind}', whose selection rule does not rank forced"):
        with moekit.mask_experts(model, forced={0: [1]}):
            pass
    assert model[0].router.expert_mask_E is None


# ------------------------------------------------------------------------------ the context manager
def test_masks_nest_and_restore_even_after_an_error():
    model = _model(kind="topk", k=2)
    router = model[0].router
    with moekit.mask_experts(model, disabled={0: [1]}):
        outer = router.expert_mask_E.clone()
        with moekit.mask_experts(model, disabled={0: [2]}, forced={0: [1]}):
            assert router.expert_mask_E.tolist() == [0, 1, -1, 0, 0, 0, 0, 0]  # the inner call wins on expert 1
        assert torch.equal(router.expert_mask_E, outer)
        with pytest.raises(RuntimeError, match="boom"), moekit.mask_experts(model, disabled={0: [5]}):
            raise RuntimeError("boom")
        assert torch.equal(router.expert_mask_E, outer)
    assert router.expert_mask_E is None and model[1].router.expert_mask_E is None


def test_masking_changes_no_weight():
    model = _model(kind="topk", k=2)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with moekit.mask_experts(model, disabled={0: [0, 1]}, forced={1: [2]}):
        model(_x()).sum().backward()
        assert list(model.state_dict()) == list(state)  # the mask is not state
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


@pytest.mark.parametrize(("kw", "msg"), [
    (dict(disabled={0: [0, 1, 2, 3, 4, 5, 6]}), "would keep 1 enabled experts, but router 'topk'"),
    (dict(disabled={0: [1]}, forced={0: [1]}), r"experts \[1\] are both disabled and forced"),
    (dict(disabled=[1, 2]), "expected a mapping"),
    (dict(disabled={-1: [0]}), "layer -1 is out of range"),
    (dict(forced={0: [0, 1, 2]}), "3 forced experts do not fit in k=2 slots"),
])
def test_invalid_masks_name_the_problem(kw, msg):
    model = _model(kind="topk", k=2)
    with pytest.raises(ValueError, match=msg):
        with moekit.mask_experts(model, **kw):
            pass
    assert model[0].router.expert_mask_E is None


def test_recurrent_router_is_refused():
    cfg = moekit.MoEConfig(d_model=D, d_expert=8, num_experts=E,
                           router=moekit.RouterConfig(kind="recurrent", gru_dim=8))
    model = nn.Sequential(moekit.MoELayer(cfg))
    with pytest.raises(ValueError, match="router kind 'recurrent', which computes its logits in its own forward"):
        with moekit.mask_experts(model, disabled={0: [0]}):
            pass


def test_no_moe_layer_is_a_clear_error():
    with pytest.raises(ValueError, match="Linear contains no MoELayer"):
        with moekit.mask_experts(nn.Linear(2, 2), disabled={0: [0]}):
            pass
