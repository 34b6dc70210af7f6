"""Top-k router family: selection rules, weights, groups, bias."""

import dataclasses
import warnings

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
    # softmax over the top-k logits == renormalised top-k of the full softmax
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
    assert not cfg.is_causal()
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


# --------------------------------------------------------------- k = 1 keeps a task gradient (issue 11, item 5)
def gate_grad_from_task_loss(layer, state=None):
    x = torch.randn(32, 32, generator=torch.Generator().manual_seed(0))
    y = layer(x, router_state=state)
    y.pow(2).sum().backward()  # no aux loss: only the task reaches the gate
    return layer.router.weight.grad.abs().max().item()


def test_k1_default_is_the_raw_probability_with_a_task_gradient(make_cfg):
    r = make_router(k=1)
    out = r(torch.randn(6, 16))
    torch.testing.assert_close(out.weight_N, out.scores_TE.gather(1, out.expert_idx_N.unsqueeze(1)).squeeze(1))
    assert bool((out.weight_N < 1).all())
    assert gate_grad_from_task_loss(moekit.MoELayer(make_cfg(k=1))) > 1e-2
    # RMoE with select_rule="topk" and moekit.route(k=1) resolve the same default
    rec = moekit.MoELayer(make_cfg(kind="recurrent", k=1, gru_dim=8))
    assert gate_grad_from_task_loss(rec, moekit.RecurrentState(torch.nn.GRUCell(8, 8))) > 1e-2
    layer = moekit.MoELayer(make_cfg(k=2))
    with moekit.route(layer, k=1):
        layer(torch.randn(5, 32))
        info = layer.routing_info()
    assert bool((info.route.weight_N < 1).all())


def test_explicit_normalize_with_k1_warns_once_and_starves_the_gate(make_cfg, monkeypatch):
    from moekit.routers import base

    monkeypatch.setattr(base, "_WARNED", set())
    with pytest.warns(UserWarning, match="exactly 1.0"):
        layer = moekit.MoELayer(make_cfg(k=1, normalize=True))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        moekit.MoELayer(make_cfg(k=1, normalize=True))  # once per process
    raw = moekit.MoELayer(make_cfg(k=1))
    raw.load_state_dict(layer.state_dict())
    # a weight of exactly 1.0 leaves the gate only rounding noise (the issue measured 1.7e-8 vs 0.27)
    assert gate_grad_from_task_loss(layer) < 1e-3 * gate_grad_from_task_loss(raw)


# ------------------------------------------------------ routing state keeps its precision (issue 11, item 6)
def bf16_exact_layer(make_cfg):
    layer = moekit.MoELayer(make_cfg(num_experts=8, k=2, score="sigmoid", bias_update_rate=1e-3)).eval()
    with torch.no_grad():
        layer.router.weight.copy_(layer.router.weight.bfloat16().float())  # the gate itself survives a cast
        layer.router.e_score_correction_bias.copy_(
            1.0 + 0.05 * torch.randn(8, generator=torch.Generator().manual_seed(1)))
    return layer


def chosen(layer, x):
    with torch.no_grad():
        layer(x)
    return layer.routing_info().route.to_padded()[0].sort(-1).values


@pytest.mark.parametrize("cast", ["to_bf16", "half"])
def test_casting_the_layer_keeps_the_selection_bias_in_fp32(make_cfg, cast):
    layer = bf16_exact_layer(make_cfg)
    x = torch.randn(256, 32, generator=torch.Generator().manual_seed(2)).bfloat16()
    before = chosen(layer, x.float())
    bias = layer.router.e_score_correction_bias.clone()
    assert not torch.equal(bias.bfloat16().float(), bias)  # a cast would round it
    layer = layer.to(torch.bfloat16) if cast == "to_bf16" else layer.half()
    kept = layer.router.e_score_correction_bias
    assert kept.dtype == torch.float32 and torch.equal(kept, bias)
    assert layer.experts.gate_up_proj.dtype != torch.float32  # the rest was cast
    after = chosen(layer, x if cast == "to_bf16" else x.half())
    assert torch.equal(after, before)  # no token re-routes
    # a 1e-3 update moves the bias (bf16 would round 1 + 1e-3 back to 1) and moves routing: push the k-th
    # choice of the closest-call token down and its runner-up up (the other experts' counts sit at the mean)
    biased_TE = layer.routing_info().route.scores_TE + bias
    top_TK = biased_TE.topk(3, dim=-1)
    margin_T = top_TK.values[:, 1] - top_TK.values[:, 2]
    t = int(margin_T.argmin())
    assert margin_T[t] < 2e-3
    counts_E = torch.full((8,), 10)
    counts_E[top_TK.indices[t, 1]], counts_E[top_TK.indices[t, 2]] = 11, 9
    layer.router.update_bias(counts_E)
    delta_E = layer.router.e_score_correction_bias - bias
    torch.testing.assert_close(delta_E.abs().sum(), torch.tensor(2e-3), rtol=0, atol=1e-6)
    assert bool((bias.bfloat16() + delta_E.bfloat16() == bias.bfloat16()).all())  # lost in bf16
    assert (chosen(layer, x if cast == "to_bf16" else x.half()) != before).any()


def test_device_moves_keep_the_same_bias_tensor_values(make_cfg):
    layer = bf16_exact_layer(make_cfg)
    bias = layer.router.e_score_correction_bias.clone()
    layer.to("cpu", torch.float64)
    assert layer.router.e_score_correction_bias.dtype == torch.float32
    assert torch.equal(layer.router.e_score_correction_bias, bias)
    assert layer.router.weight.dtype == torch.float64


# ------------------------------------------------------------------ normalisation faithful to each reference (item 2)
def test_sigmoid_normalisation_matches_transformers_deepseek_v3_on_vanishing_scores():
    r = make_router(E=4, k=2, score="sigmoid", normalize=True)
    logits = torch.tensor([[-120.0, -121.0, -200.0, -200.0]])  # sigmoid sums ~1e-52: +1e-20 dominates
    out = r.select(logits, torch.zeros(1, 16))
    w = torch.sigmoid(logits)[:, :2]
    torch.testing.assert_close(out.to_padded()[1].sort(-1, descending=True).values, w / (w.sum() + 1e-20))


# --------------------------------------------- balance losses count the unbiased plain top-k (items 9, 10)
def test_balance_assignment_is_the_plain_topk_of_unbiased_scores():
    r = make_router(E=8, k=2, score="sigmoid", bias_update_rate=1e-3)
    x = torch.randn(30, 16)
    r.e_score_correction_bias[3] = 10.0
    out = r(x)
    tok, exp = r.balance_assignment(out, None)
    plain = torch.topk(out.scores_TE, 2, dim=-1).indices.sort(-1).values
    assert torch.equal(exp.view(30, 2).sort(-1).values, plain) and torch.equal(tok, torch.arange(30).repeat_interleave(2))
    assert (out.expert_idx_N == 3).sum() == 30 and (plain == 3).sum() < 30  # routed != counted
    valid = torch.arange(30) < 20
    tok, exp = r.balance_assignment(out, valid)
    assert int(tok.max()) == 19 and exp.numel() == 40
    r.e_score_correction_bias.zero_()
    r.cfg.bias_update_rate = 0.0
    out = r(x)
    # No bias, no groups: the counted experts are the routed ones (recomputed: asking whether the bias is
    # zero would be a host sync per layer).
    assert torch.equal(r.balance_assignment(out, None)[1], out.expert_idx_N)


# ---------------------------------------------------------------------- expert choice and padding (issue 11, item 4)
def ec_router(E=2, cf=1.0):
    return ExpertChoiceRouter(moekit.RouterConfig(kind="expert_choice", ec_capacity_factor=cf).validate(E), 16, E)


def test_expert_choice_excludes_padding_before_experts_pick():
    """T = 2 with token 1 padding, E = 2, capacity factor 1: the real token gets both experts."""
    out = ec_router().select(torch.tensor([[0.4, 0.0], [2.2, 0.0]]), torch.zeros(2, 16), torch.tensor([True, False]))
    assert out.token_idx_N.tolist() == [0, 0] and sorted(out.expert_idx_N.tolist()) == [0, 1]


def test_expert_choice_capacity_over_valid_tokens_and_ties_to_the_earlier_token():
    r = ec_router(E=4, cf=2.0)
    valid = torch.tensor([True, False, True, True, False, True, True, True])  # 6 valid tokens
    out = r.select(torch.randn(8, 4), torch.zeros(8, 16), valid)
    assert torch.equal(out.counts_E(), torch.full((4,), 3))  # round(2 * 6 / 4), not round(2 * 8 / 4) = 4
    assert valid[out.token_idx_N].all()
    tied = r.select(torch.zeros(8, 4), torch.zeros(8, 16), valid)  # every score ties
    for e in range(4):
        assert tied.token_idx_N[tied.expert_idx_N == e].tolist() == [0, 2, 3]


def test_expert_choice_layer_gives_padding_no_slot(make_cfg):
    layer = moekit.MoELayer(make_cfg(kind="expert_choice", ec_capacity_factor=1.0, num_experts=2))
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0, 0] = 1.0
    x = torch.zeros(1, 2, 32)
    x[0, 0, 0], x[0, 1, 0] = 0.4, 2.2
    y = layer(x, padding_mask=torch.tensor([[True, False]]))
    info = layer.routing_info()
    assert info.route.token_idx_N.tolist() == [0, 0] and int(info.counts_E.sum()) == 2
    assert bool((y[0, 1] == 0).all())


def _gshard_router(policy: str):
    from moekit.routers.topk import TopKConfig, TopKRouter

    return TopKRouter(TopKConfig(k=2, second_expert=policy).validate(4), d_model=4, num_experts=4).eval()


def test_gshard_sampled_second_expert_follows_the_softmax_over_the_rest():
    """second_expert='sampling' (arXiv 2006.16668, fairseq top2gating): the first is the argmax; the second is drawn
    from the softmax over the other experts, p_j / (1 - p_0), each frequency within 4 standard errors over 20000
    tokens; weights are the picks' probabilities renormalised."""
    from moekit.routers.topk import select_top2_gshard

    logits_TE = torch.tensor([2.0, 1.0, 0.5, 0.0]).expand(20000, 4)
    p_E = torch.softmax(logits_TE[0], -1)
    torch.manual_seed(0)
    out = select_top2_gshard(logits_TE, "sampling")
    idx_TK, w_TK = out.to_padded()
    assert (idx_TK[:, 0] == 0).all()
    freq = torch.bincount(idx_TK[:, 1], minlength=4).float() / 20000
    want = p_E / (1 - p_E[0])
    want[0] = 0
    assert ((freq - want).abs() <= 4 * (want * (1 - want) / 20000).sqrt() + 1e-9).all(), (freq, want)
    torch.testing.assert_close(w_TK[:, 1], p_E[idx_TK[:, 1]] / (p_E[0] + p_E[idx_TK[:, 1]]))
    assert _gshard_router("sampling").cfg.describe().endswith("second_expert=sampling")


def test_gshard_random_second_expert_is_kept_with_probability_2p():
    """second_expert='random': the next best, kept where 2 p > u (p its softmax probability, <= 1/2): about 2p of
    the tokens keep it (within 4 standard errors, for two distributions), the others use one expert."""
    from moekit.routers.topk import select_top2_gshard

    logits_TE = torch.tensor([[2.0, 1.0, 0.5, 0.0], [0.1, 0.0, -9.0, -9.0]]).repeat(10000, 1)
    torch.manual_seed(0)
    out = select_top2_gshard(logits_TE, "random")
    picks_T2 = out.experts_per_token_T().view(10000, 2)
    for row in range(2):
        p = float(torch.softmax(logits_TE[row], -1)[1])
        rate = float((picks_T2[:, row] == 2).float().mean())
        assert abs(rate - 2 * p) <= 4 * (2 * p * (1 - 2 * p) / 10000) ** 0.5, (row, rate, 2 * p)
    idx_TK = out.expert_idx_N[out.token_idx_N % 2 == 0].view(-1)
    assert set(idx_TK.tolist()) == {0, 1}  # the first, and where kept the next best
    assert not _gshard_router("random").cfg.fixed_experts_per_token()


def test_gshard_second_expert_needs_top2_softmax():
    from moekit.routers.topk import TopKConfig

    with pytest.raises(ValueError, match="RouterConfig.second_expert"):
        TopKConfig(k=3, second_expert="sampling").validate(8)


@pytest.mark.parametrize("bias_on", ["scores", "logits"])
@pytest.mark.parametrize("p", [1.0, 2.0])
def test_softmax_bias_choosing_underflowed_experts_gives_zero_weights_not_nan(bias_on, p):
    """A selection bias can steer a token away from its largest probability to experts whose softmax
    probabilities underflow to 0: their renormalised weights stay 0 (the zero-sum guard), never 0/0 = NaN,
    in the general path and the layer's inference path alike."""
    from moekit.layers.moe import MoELayer, _DenseRoute, reference_path

    layer = MoELayer(moekit.MoEConfig(d_model=16, num_experts=8, d_expert=8, router=moekit.RouterConfig(
        kind="topk", k=2, normalize_p=p, selection_bias_on=bias_on))).eval()
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0, 0] = 300.0  # expert 0 takes all the probability: the others' underflow to 0
        layer.router.e_score_correction_bias.copy_(torch.tensor([0.0] + [400.0] * 7))  # ... but is never chosen
    x = torch.zeros(3, 16)
    x[:, 0] = 1.0
    with torch.no_grad():
        y = layer(x)
        assert isinstance(layer._info, _DenseRoute)
        w_N = layer.routing_info().route.weight_N
        with reference_path():
            y_ref = layer(x)
        w_ref_N = layer.routing_info().route.weight_N
    assert not (layer.routing_info().route.expert_idx_N == 0).any()
    assert torch.equal(w_N, torch.zeros(6)) and torch.equal(w_ref_N, torch.zeros(6))
    assert torch.isfinite(y).all() and torch.equal(y, y_ref)


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("groups", [1, 2])
def test_a_dropped_selection_bias_routes_as_a_zero_one_bit_for_bit(score, groups):
    # A pretrained router without a selection bias holds none (moekit.hf): the plain top-k of the scores, its
    # values read directly instead of a zero bias added and the chosen scores gathered back.
    r = make_router(E=8, k=2, score=score, n_group=groups, topk_group=1)
    x = torch.randn(64, 16)
    with torch.no_grad():
        zero = r(x)
        zero_dense = r.dense_choice(x)
        r.drop_selection_bias()
        assert r.e_score_correction_bias is None and "e_score_correction_bias" not in r.state_dict()
        dropped = r(x)
        dropped_dense = r.dense_choice(x)
    for a, b in zip(zero.to_padded(), dropped.to_padded(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(zero_dense, dropped_dense, strict=True):
        assert torch.equal(a, b)


def test_a_bias_assigned_after_dropping_is_used_and_updates_start_from_zero():
    r = make_router(E=4, k=1, score="sigmoid", normalize=False)
    r.drop_selection_bias()
    x = torch.randn(20, 16)
    r.e_score_correction_bias = torch.tensor([0.0, 0.0, 10.0, 0.0])  # never silently ignored
    assert bool((r(x).to_padded()[0] == 2).all())
    r.drop_selection_bias()
    r.cfg = dataclasses.replace(r.cfg, bias_update_rate=0.1)
    r.update_bias(torch.tensor([10, 0, 5, 5]))
    torch.testing.assert_close(r.e_score_correction_bias, torch.tensor([-0.1, 0.1, 0.0, 0.0]))
    with pytest.raises(ValueError, match="bias_update_rate=0.1 updates the selection bias; expected 0"):
        r.drop_selection_bias()


def test_a_dropped_selection_bias_loads_a_saved_one():
    # A router that dropped its bias (moekit.hf) and then trained one (update_bias under bias_update_rate > 0) saves
    # it; a router that holds none must load it back (strict), not refuse the key as unexpected.
    trained, fresh = make_router(E=4, k=1, score="sigmoid"), make_router(E=4, k=1, score="sigmoid")
    trained.load_state_dict(fresh.state_dict())
    trained.drop_selection_bias()
    fresh.drop_selection_bias()
    trained.cfg = dataclasses.replace(trained.cfg, bias_update_rate=0.1)
    trained.update_bias(torch.tensor([10, 0, 5, 5]))
    fresh.load_state_dict(trained.state_dict())
    assert fresh.e_score_correction_bias.dtype == torch.float32
    torch.testing.assert_close(fresh.e_score_correction_bias, torch.tensor([-0.1, 0.1, 0.0, 0.0]))
    x = torch.randn(20, 16)
    assert torch.equal(fresh(x).to_padded()[0], trained(x).to_padded()[0])
    wrong = make_router(E=4, k=1)
    wrong.drop_selection_bias()
    with pytest.raises(RuntimeError, match="size mismatch for e_score_correction_bias"):
        wrong.load_state_dict({**trained.state_dict(), "e_score_correction_bias": torch.zeros(3)})


def test_softmax_after_topk_is_gpt_oss_router_bit_for_bit():
    # openai/gpt-oss gpt_oss/torch/model.py MLPBlock and transformers' GptOssTopKRouter: topk of the logits
    # (sorted), softmax over those k values.
    r = make_router(E=8, k=3, softmax_after_topk=True)
    x = torch.randn(50, 16)
    with torch.no_grad():
        out = r(x)
        plain = make_router(E=8, k=3)
        plain.weight.copy_(r.weight)
        renormalised = plain(x)
    top = torch.topk(out.logits_TE, 3, dim=-1)
    idx, w = out.to_padded()
    assert torch.equal(idx, top.indices) and torch.equal(w, torch.softmax(top.values, dim=-1))
    # the renormalised top k of the softmax in exact arithmetic: the same experts, weights to rounding
    p_idx, p_w = renormalised.to_padded()
    order, p_order = idx.argsort(-1), p_idx.argsort(-1)
    assert torch.equal(idx.gather(1, order), p_idx.gather(1, p_order))
    torch.testing.assert_close(w.gather(1, order), p_w.gather(1, p_order), atol=1e-6, rtol=1e-6)
    assert torch.equal(out.scores_TE, torch.softmax(out.logits_TE, dim=-1))  # scores: the full softmax


def test_softmax_after_topk_picks_the_larger_logit_where_probabilities_underflow_to_a_tie():
    logits_TE = torch.tensor([[0.0, -300.0, -200.0, -250.0]])
    from moekit.routers.topk import topk_choice
    idx, w, _ = topk_choice(logits_TE, 2, softmax_after_topk=True)
    assert idx.tolist() == [[0, 2]] and w[0, 0] == 1.0 and w[0, 1] == 0.0
    scores = torch.softmax(logits_TE, dim=-1)
    assert scores[0, 1] == scores[0, 2] == scores[0, 3] == 0  # the tie the softmax's top k would break by index


def test_softmax_after_topk_weights_carry_the_gate_gradient():
    r = make_router(E=8, k=2, softmax_after_topk=True)
    x = torch.randn(10, 16)
    w = r(x).weight_N
    w.pow(2).sum().backward()
    assert r.weight.grad is not None and bool(r.weight.grad.abs().sum() > 0)


@pytest.mark.parametrize("bad", [dict(score="sigmoid"), dict(normalize=False), dict(normalize_p=2.0),
                                 dict(normalize_min=0.1), dict(n_group=2, topk_group=1),
                                 dict(n_group=2, topk_group=1, group_score="top2_sum")])
def test_softmax_after_topk_needs_renormalised_softmax_scores(bad):
    with pytest.raises(ValueError, match="RouterConfig.softmax_after_topk"):
        make_router(E=8, k=2, softmax_after_topk=True, **bad)


def _reference_after_topk(logits_TE, k):
    """gpt-oss's MLPBlock / transformers' GptOssTopKRouter: topk of the logits (sorted), softmax over the k values."""
    top = torch.topk(logits_TE, k, dim=-1)
    return top.indices, torch.softmax(top.values, dim=-1)


@pytest.mark.filterwarnings(r"ignore:RouterConfig\(normalize=True, k=1\)")  # k = 1: gpt-oss's weight 1.0 is meant
@pytest.mark.parametrize("k", [1, 3, 8])
def test_softmax_after_topk_train_and_inference_paths_agree_with_the_reference_forward_and_backward(k):
    """The autograd path (gather of the chosen logits) and the no-grad path (topk's own values, dense_choice) give
    the reference's experts and weights bit for bit, and the gate's gradient is the reference's. k = 1: weight 1.0
    (transformers' softmax over one value); k = E: a softmax over every logit, in descending order."""
    r = make_router(E=8, k=k, normalize=True, softmax_after_topk=True).train()
    r.drop_selection_bias()  # topk's own values (as moekit.hf holds it); the zero-bias form is the gather path
    x_TD = torch.randn(40, 16, generator=torch.Generator().manual_seed(3))
    out = r(x_TD)  # token-major (T * k): to_padded would detach the weights
    idx_TK, w_TK = out.expert_idx_N.view(40, k), out.weight_N.view(40, k)
    w_TK.mul(torch.arange(1.0, k + 1)).sum().backward()
    grad = r.weight.grad.clone()
    weight = r.weight.detach().clone().requires_grad_()
    ref_idx_TK, ref_w_TK = _reference_after_topk(x_TD @ weight.T, k)
    ref_w_TK.mul(torch.arange(1.0, k + 1)).sum().backward()
    assert torch.equal(idx_TK, ref_idx_TK) and torch.equal(w_TK.detach(), ref_w_TK.detach())
    torch.testing.assert_close(grad, weight.grad, atol=1e-6, rtol=1e-6)
    if k == 1:
        assert bool((w_TK == 1.0).all()) and grad.abs().sum() == 0  # the weight is 1: no gate gradient, as gpt-oss
    else:
        assert grad.abs().sum() > 0
    with torch.no_grad():
        d_idx_TK, d_w_TK = r.eval().dense_choice(x_TD)[:2]
    assert torch.equal(d_idx_TK, ref_idx_TK) and torch.equal(d_w_TK, ref_w_TK.detach())


def test_softmax_after_topk_with_an_expert_mask_never_picks_a_disabled_expert_and_weights_a_forced_one_by_its_logit():
    """Disabled experts' logits are -inf before the choice, a forced one takes a slot whatever its logit; the
    weights are the softmax over the chosen experts' own (finite) logits, as the renormalised rule's."""
    r = make_router(E=8, k=3, softmax_after_topk=True)
    plain = make_router(E=8, k=3)
    with torch.no_grad():
        plain.weight.copy_(r.weight)
    mask_E = torch.tensor([0, -1, 0, 1, 0, -1, 0, 0], dtype=torch.int8)
    r.expert_mask_E = plain.expert_mask_E = mask_E
    x_TD = torch.randn(64, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = r(x_TD)
        p_idx_TK, p_w_TK = plain(x_TD).to_padded()
    idx_TK, w_TK = out.to_padded()
    assert not bool(((idx_TK == 1) | (idx_TK == 5)).any()) and bool((idx_TK == 3).any(-1).all())
    assert torch.isfinite(w_TK).all() and bool((w_TK > 0).all())
    enabled_TE = out.logits_TE.masked_fill(mask_E < 0, float("-inf"))
    want = torch.softmax(enabled_TE.gather(1, idx_TK), dim=-1)
    assert torch.equal(w_TK, want)
    order, p_order = idx_TK.argsort(-1), p_idx_TK.argsort(-1)
    assert torch.equal(idx_TK.gather(1, order), p_idx_TK.gather(1, p_order))
    torch.testing.assert_close(w_TK.gather(1, order), p_w_TK.gather(1, p_order), atol=1e-6, rtol=1e-6)


def test_softmax_after_topk_breaks_logit_ties_as_torch_topk_and_reads_bf16_gates_in_fp32():
    """Tied logits: torch.topk's pick (the reference's own op on the same values) and equal weights; a bf16 gate
    scores in fp32 (Router.logits), so the weights are fp32 and sum to 1."""
    from moekit.routers.topk import topk_choice

    logits_TE = torch.tensor([[1.0, 3.0, 3.0, 3.0, -1.0], [float("-inf"), 0.5, 0.5, 2.0, 0.5]])
    idx_TK, w_TK, _ = topk_choice(logits_TE, 2, softmax_after_topk=True)
    ref_idx_TK, ref_w_TK = _reference_after_topk(logits_TE, 2)
    assert torch.equal(idx_TK, ref_idx_TK) and torch.equal(w_TK, ref_w_TK)
    assert w_TK[0].tolist() == [0.5, 0.5]
    r = make_router(E=8, k=2, softmax_after_topk=True).to(torch.bfloat16)
    with torch.no_grad():
        idx_TK, w_TK = r(torch.randn(16, 16, dtype=torch.bfloat16)).to_padded()
    assert w_TK.dtype == torch.float32
    torch.testing.assert_close(w_TK.sum(-1), torch.ones(16))


def test_softmax_after_topk_adds_the_selection_bias_to_the_logits_for_the_choice_only():
    """Aux-loss-free balancing with gpt-oss's rule: the bias (in logit units) moves the choice, the weights stay
    the softmax over the chosen experts' unbiased logits; update_bias trains it as for the other rules."""
    r = make_router(E=8, k=2, softmax_after_topk=True, bias_update_rate=0.5)
    x_TD = torch.randn(32, 16, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        r.e_score_correction_bias[6] = 1e3  # far above any logit gap: expert 6 in every token's choice
        out = r(x_TD)
    idx_TK, w_TK = out.to_padded()
    assert bool((idx_TK == 6).any(-1).all())
    assert torch.equal(w_TK, torch.softmax(out.logits_TE.gather(1, idx_TK), dim=-1))
    counts_E = torch.bincount(idx_TK.flatten(), minlength=8)
    r.update_bias(counts_E)
    assert r.e_score_correction_bias[6] == 1e3 - 0.5  # the over-used expert's bias goes down


def test_softmax_after_topk_round_trips_through_the_config_dict_and_old_dicts_read_false():
    cfg = moekit.RouterConfig(k=2, softmax_after_topk=True)
    d = cfg.to_dict()
    assert d["softmax_after_topk"] is True and moekit.RouterConfig.from_dict(d) == cfg
    old = {key: v for key, v in d.items() if key != "softmax_after_topk"}
    assert moekit.RouterConfig.from_dict(old).softmax_after_topk is False


def test_rerouting_a_softmax_after_topk_layer():
    """moekit.route on a gpt-oss rule: another k keeps the rule (a softmax over the new top k of the logits);
    top-p is its own rule (the field is not top-p's); a setting the rule refuses names it; exit restores it."""
    layer = moekit.MoELayer(moekit.MoEConfig(d_model=16, d_expert=8, num_experts=8,
                                             router=moekit.RouterConfig(k=2, softmax_after_topk=True))).eval()
    x_TD = torch.randn(12, 16, generator=torch.Generator().manual_seed(9))
    with moekit.route(layer, k=3), torch.no_grad():
        out = layer.router(x_TD)
        idx_TK, w_TK = out.to_padded()
        ref_idx_TK, ref_w_TK = _reference_after_topk(out.logits_TE, 3)
        assert torch.equal(idx_TK, ref_idx_TK) and torch.equal(w_TK, ref_w_TK)
    with moekit.route(layer, kind="topp", p=0.5):
        assert layer.router.cfg.kind == "topp" and not hasattr(layer.router.cfg, "softmax_after_topk")
    with pytest.raises(ValueError, match="softmax_after_topk"):
        moekit.route(layer, normalize=False)
    assert layer.router.cfg.softmax_after_topk and layer.router.cfg.k == 2


@pytest.mark.parametrize("built,asked", [(False, True), (True, False)])
def test_a_reroute_of_learned_scale_the_router_cannot_follow_is_refused(built, asked):
    # Before: route(learned_scale=...) on a top-k layer was accepted and changed nothing (global_scale is made,
    # or not, at construction): an Inkling-style layer kept scaling its weights with a config saying it does not.
    cfg = moekit.MoEConfig(d_model=16, d_expert=8, num_experts=6,
                           router=moekit.RouterConfig(kind="topk", k=2, learned_scale=built))
    layer = moekit.MoELayer(cfg).eval()
    with pytest.raises(ValueError, match=rf"route\(\): RouterConfig\(kind='topk'\) learned_scale={asked}: the router "
                                         rf".* global_scale, which does not change; expected learned_scale={built}$"):
        moekit.route(layer, learned_scale=asked)
    assert layer.router.cfg.learned_scale is built
    with moekit.route(layer, k=3):  # a field read at every forward is honoured
        assert layer.router.cfg.k == 3
