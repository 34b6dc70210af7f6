"""SMoE-Dropout random router (arXiv 2303.01610): frozen gate, k schedules, self-slimmable k."""

import pytest
import torch

import moekit
from moekit.routers.random import SCHEDULES, scheduled_k


@pytest.mark.parametrize("schedule,S,k_min,k_max,s,expected", [
    # The reference code's curves (VITA-Group/Random-MoE-as-Dropout, new_utils.calculate_gate_number);
    # moekit's earlier curves gave 2, 1, 1 on the first three rows.
    ("cosine", 10, 1, 4, 3, 1),            # round(-3 * cos(3pi/20)) + 4 = round(-2.67) + 4
    ("exponential", 300, 1, 4, 19, 2),     # round(-3 * 0.99 ** 19) + 4 = round(-2.48) + 4
    ("multistep", 10, 1, 4, 2, 2),         # [1, 2, 4, 8, 16][int(5 * 2 / 10)]
    ("linear", 10, 1, 6, 5, 3),            # round(5 * 0.5) + 1: Python rounds 2.5 half to even, to 2
    # the paper's setting: k 8 -> 16 over S = 400000 steps, halfway
    ("cosine", 400_000, 8, 16, 200_000, 10),
    ("exponential", 400_000, 8, 16, 200_000, 14),
    ("multistep", 400_000, 8, 16, 200_000, 8),   # [1, 2, 4, 8, 16][2] = 4, clipped to k_min
    ("linear", 400_000, 8, 16, 200_000, 12),
])
def test_schedule_values_match_the_reference(schedule, S, k_min, k_max, s, expected):
    assert scheduled_k(schedule, s, S, k_min, k_max) == expected


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("S", [50, 300, 1000])
def test_schedules_are_monotone_and_clipped(schedule, S):
    ks = [scheduled_k(schedule, s, S, 2, 7) for s in range(2 * S)]
    assert ks[0] == 2  # multistep's first stage (1) is clipped to k_min
    assert ks[-1] == 7 and min(ks) >= 2 and max(ks) <= 7
    assert all(a <= b for a, b in zip(ks, ks[1:], strict=False))


def test_k_grows_with_optimizer_steps_and_eval_uses_k(make_cfg):
    layer = moekit.MoELayer(make_cfg(kind="random", k=3, min_k=1, max_k=4, k_schedule_steps=3, num_experts=8))
    x = torch.randn(5, 32)
    seen = []
    for _ in range(5):
        layer.train()
        layer(x)
        seen.append(layer.routing_info().stats()["experts_per_token_mean"])
        moekit.after_optimizer_step(layer)
    assert seen == [1.0, 2.0, 3.0, 4.0, 4.0]
    assert int(layer.router.step) == 5 and "router.step" in layer.state_dict()
    layer.eval()
    layer(x)
    assert layer.routing_info().stats()["experts_per_token_mean"] == 3.0
    with moekit.route(layer, k=6):  # self-slimmable: any k at inference
        layer(x)
        assert layer.routing_info().stats()["experts_per_token_mean"] == 6.0


def test_gate_is_frozen_and_weights_are_softmax_over_selected(make_cfg):
    layer = moekit.MoELayer(make_cfg(kind="random", k=2, num_experts=8)).eval()
    x = torch.randn(7, 32, requires_grad=True)
    layer(x).sum().backward()
    assert layer.router.weight.grad is None and layer.router.bias.grad is None
    assert not layer.router.weight.requires_grad
    r = layer.routing_info().route
    idx, w = r.to_padded()
    torch.testing.assert_close(w, torch.softmax(r.logits_TE.gather(1, idx), -1))
    assert torch.equal(idx.sort(-1).values, r.logits_TE.topk(2).indices.sort(-1).values)


def test_random_config_errors():
    with pytest.raises(ValueError, match="k_schedule='step' is invalid"):
        moekit.RouterConfig(kind="random", k_schedule="step").validate(8)
    with pytest.raises(ValueError, match="k_schedule_steps=0"):
        moekit.RouterConfig(kind="random", k_schedule_steps=0).validate(8)
