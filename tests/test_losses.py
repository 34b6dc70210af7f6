"""Auxiliary losses on hand-made inputs with known values."""

import math

import torch

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
