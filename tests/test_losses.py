"""Auxiliary losses on hand-made inputs with known values."""

import math

import pytest
import torch

import moekit
from moekit import losses


def test_switch_loss_is_k_at_perfect_balance_and_larger_when_collapsed():
    T, E, k = 8, 4, 2
    uniform = torch.full((T, E), 1 / E)
    counts = torch.full((E,), T * k // E)
    torch.testing.assert_close(losses.load_balance_loss(uniform, counts, T), torch.tensor(float(k)))
    collapsed = torch.zeros(T, E)
    collapsed[:, 0] = 1.0
    lb = losses.load_balance_loss(collapsed, torch.tensor([T, 0, 0, 0]), T)
    torch.testing.assert_close(lb, torch.tensor(float(E)))


def test_switch_loss_gradient_only_through_probabilities():
    scores = torch.rand(5, 3, requires_grad=True)
    counts = torch.tensor([4.0, 1.0, 5.0], requires_grad=True)
    losses.load_balance_loss(scores, counts, 5).backward()
    assert counts.grad is None
    # d/dP_i of E * sum f_i P_i with P = mean over tokens: E * f_i / T
    expected = (3 * counts.detach() / 5 / 5).expand(5, 3)
    torch.testing.assert_close(scores.grad, expected)


def test_z_loss_value_and_mask():
    logits = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    lse = torch.logsumexp(logits, -1)
    torch.testing.assert_close(losses.z_loss(logits), (lse ** 2).mean())
    torch.testing.assert_close(losses.z_loss(logits, torch.tensor([True, False])),
                               torch.tensor(math.log(2) ** 2))


def test_sequence_balance_is_one_when_balanced():
    B, T, E, k = 2, 4, 4, 1
    scores = torch.full((B, T, E), 0.5)  # sigmoid-like, normalised per token inside
    token = torch.arange(B * T)
    expert = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    torch.testing.assert_close(losses.sequence_balance_loss(scores, expert, token, k), torch.tensor(1.0))
    # everything on expert 0 in each sequence, with the scores agreeing: loss E
    s = torch.zeros(B, T, E)
    s[..., 0] = 1.0
    torch.testing.assert_close(losses.sequence_balance_loss(s, torch.zeros(8, dtype=torch.long), token, k),
                               torch.tensor(4.0))


# ---------------------------------------------------------- Switch loss on sigmoid routers (issue 11, item 8)
def sigmoid_layer(shift: float = 0.0):
    """E = 8, k = 2, sigmoid scores; x[:, 0] = 1 and gate column 0 = `shift`, so every logit moves by
    `shift` while the routing (top-k of monotone scores, no bias) stays the same."""
    torch.manual_seed(0)
    cfg = moekit.MoEConfig(d_model=16, d_expert=8, num_experts=8, router=moekit.RouterConfig(k=2, score="sigmoid"))
    layer = moekit.MoELayer(cfg)
    with torch.no_grad():
        layer.router.weight[:, 0] = shift
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(1))
    x[:, 0] = 1.0
    layer(x)
    return layer.routing_info()


def test_sigmoid_balance_loss_uses_per_token_normalised_scores():
    info = sigmoid_layer()
    s = torch.sigmoid(info.route.logits_TE)
    f = info.route.counts_E().float() / 64
    expected = 8 * (f * (s / s.sum(-1, keepdim=True)).mean(0)).sum()  # Megatron-LM's P
    torch.testing.assert_close(info.aux["load_balance"].detach(), expected)
    raw = 8 * (f * s.mean(0)).sum()
    assert raw > 3 * expected  # raw sigmoids: a loss ~4x larger, with a different minimiser


def test_shifting_every_logit_down_does_not_lower_the_sigmoid_balance_loss():
    base, shifted = sigmoid_layer(0.0), sigmoid_layer(-3.0)
    assert torch.equal(base.route.to_padded()[0], shifted.route.to_padded()[0])  # same routing
    assert shifted.aux["load_balance"] >= base.aux["load_balance"] - 1e-6
    # the raw-sigmoid loss could be gamed that way: it drops by more than half
    def raw(info):
        return losses.load_balance_loss(torch.sigmoid(info.route.logits_TE), info.route.counts_E(), 64)
    assert raw(shifted) < 0.5 * raw(base)


# ----------------------------------------------------- f counts the choices before capacity dropping (item 9)
def collapsed_layer(**kw):
    """E = 4, k = 1, every token routed to expert 0 with probability 77 / 80 = 0.9625."""
    cfg = moekit.MoEConfig(d_model=16, d_expert=8, num_experts=4, router=moekit.RouterConfig(k=1), **kw)
    layer = moekit.MoELayer(cfg)
    moekit.BalanceTracker(layer)  # global-batch balance keeps the step's f there
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0, 0] = math.log(77.0)
    x = torch.zeros(40, 16)
    x[:, 0] = 1.0
    layer(x)
    return layer.routing_info()


@pytest.mark.parametrize("scope", ["micro", "global"])
def test_collapse_with_a_capacity_limit_is_penalised(scope):
    info = collapsed_layer(capacity_factor=0.5, balance_scope=scope)
    assert info.num_dropped == 35  # executed: 5 of 40 (f would be 0.125 and the loss 0.48)
    torch.testing.assert_close(info.aux["load_balance"].detach(), torch.tensor(3.85))  # E * 1 * 0.9625
    assert info.aux["load_balance"] > 1.0  # above the perfectly balanced value
    # dropless gives the same value: capacity does not change what the router chose
    torch.testing.assert_close(collapsed_layer(balance_scope=scope).aux["load_balance"].detach(), torch.tensor(3.85))


# -------------------------------------------------- DeepSeek-V3 sequence-wise loss on unbiased top-k (item 10)
def test_sequence_loss_counts_the_unbiased_topk():
    """B = T = 1, E = 2, k = 1, logits [1, 0], selection bias [0, 1] -> 1.1877: the bias routes to expert 1,
    but f counts expert 0 (the plain top-1 of the affinities), P_0 = s_0 / (s_0 + s_1)."""
    cfg = moekit.MoEConfig(d_model=4, d_expert=8, num_experts=2,
                           router=moekit.RouterConfig(k=1, score="sigmoid", bias_update_rate=1e-3))
    layer = moekit.MoELayer(cfg)
    with torch.no_grad():
        layer.router.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 0]]))
        layer.router.e_score_correction_bias.copy_(torch.tensor([0.0, 1.0]))
    layer(torch.tensor([[[1.0, 0, 0, 0]]]))
    info = layer.routing_info()
    assert info.route.expert_idx_N.tolist() == [1]
    s0, s1 = torch.sigmoid(torch.tensor(1.0)), torch.tensor(0.5)
    torch.testing.assert_close(info.aux["seq_balance"].detach(), 2 * s0 / (s0 + s1))
    assert round(float(info.aux["seq_balance"].detach()), 4) == 1.1877
    # the Switch loss counts the same assignment (Megatron-LM)
    torch.testing.assert_close(info.aux["load_balance"].detach(), 2 * s0 / (s0 + s1))


def test_sequence_loss_skips_all_padding_sequences_and_empty_input():
    scores = torch.full((2, 4, 4), 0.25)
    valid = torch.tensor([[True] * 4, [False] * 4])
    token = torch.arange(4)
    expert = torch.tensor([0, 1, 2, 3])
    torch.testing.assert_close(losses.sequence_balance_loss(scores, expert, token, 1, valid), torch.tensor(1.0))
    empty = torch.zeros(2, 0, 4, requires_grad=True)
    none = torch.zeros(0, dtype=torch.long)
    out = losses.sequence_balance_loss(empty, none, none, 1)
    assert out.item() == 0.0 and out.requires_grad
