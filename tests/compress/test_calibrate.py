"""Calibration statistics against a hand computation from the layer's own routing and experts, and
the refusals of merging and quantising banks they do not express."""

import pytest
import torch

import moekit
from moekit.compress import calibrate
from moekit.compress.merge import merge_groups
from moekit.compress.quantize import QuantizedExpertBank
from moekit.errors import UsageError
from moekit.layers.moe import moe_layers


def _by_hand(model, windows):
    """Per layer: (tokens, count_E, gate_sum_E, reap_sum_E) from routing_info().executed and each expert's
    output computed by the bank's grouped forward with every row sent to that expert."""
    layers = moe_layers(model)
    seen = {}
    hooks = [m.register_forward_hook(lambda mod, a, out, i=i: seen.__setitem__(i, (a[0].reshape(-1, a[0].shape[-1]),
                                                                                 mod.routing_info().executed)))
             for i, m in enumerate(layers)]
    sums = [[0, torch.zeros(m.router.num_experts, dtype=torch.float64), torch.zeros(m.router.num_experts,
             dtype=torch.float64), torch.zeros(m.router.num_experts, dtype=torch.float64)] for m in layers]
    with torch.no_grad():
        for ids in windows.split(3):
            model(ids)
            for i, m in enumerate(layers):
                x_TD, route = seen[i]
                s = sums[i]
                s[0] += x_TD.shape[0]
                E = m.router.num_experts
                for t, e, w in zip(route.token_idx_N.tolist(), route.expert_idx_N.tolist(), route.weight_N.tolist(),
                                   strict=True):
                    offsets_E = torch.tensor([0] * e + [1] * (E - e), dtype=torch.int32)
                    y_D = m.experts(x_TD[t:t + 1], offsets_E)[0]
                    s[1][e] += 1
                    s[2][e] += w
                    s[3][e] += float(route.scores_TE[t, e]) * float(y_D.double().norm())
    for h in hooks:
        h.remove()
    return sums


@pytest.mark.parametrize("router", [{}, {"score": "sigmoid"}])
def test_frequency_gate_and_reap_equal_a_hand_computation(tiny_lm, windows, router):
    model = tiny_lm(**router)
    cal = calibrate(model, windows, batch_size=3)
    for stats, (tokens, count_E, gate_E, reap_E) in zip(cal.layers, _by_hand(model, windows), strict=True):
        assert stats.tokens == tokens == windows.numel()
        torch.testing.assert_close(stats.count_E, count_E)
        torch.testing.assert_close(stats.frequency_E(), count_E / tokens)
        torch.testing.assert_close(stats.mean_gate_E(), gate_E / count_E.clamp(min=1), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(stats.reap_E(), reap_E / count_E.clamp(min=1), rtol=1e-4, atol=1e-6)
        assert stats.count_E.sum() > 0 and (stats.reap_E() >= 0).all()


def test_per_source_calibrations_add_up(tiny_lm, windows):
    model = tiny_lm()
    both = calibrate(model, {"a": windows[:4], "b": windows[4:]}, batch_size=4)
    assert set(both.by_domain) == {"a", "b"} and both.tokens == windows.numel()
    whole = calibrate(model, windows, batch_size=4)
    for s, w in zip(both.layers, whole.layers, strict=True):
        torch.testing.assert_close(s.count_E, w.count_E)
        torch.testing.assert_close(s.reap_sum_E, w.reap_sum_E)


def test_banks_outside_the_standard_swiglu_stack_are_refused_by_merge_and_quantise():
    cfg = moekit.MoEConfig(d_model=16, d_expert=8, num_experts=4, activation="geglu",
                           router=moekit.RouterConfig(kind="topk", k=2))
    layer = moekit.MoELayer(cfg)
    with pytest.raises(UsageError, match="not the standard SwiGLU stack"):
        merge_groups(layer, [[0, 1], [2, 3]], torch.ones(4), align=True)
    clamped = moekit.MoELayer(moekit.MoEConfig(d_model=16, d_expert=8, num_experts=4, activation_limit=7.0,
                                               router=moekit.RouterConfig(kind="topk", k=2)))
    with pytest.raises(UsageError, match="not the standard SwiGLU stack"):
        QuantizedExpertBank.from_bank(clamped.experts, [8, 8, 8, 8], 8)
