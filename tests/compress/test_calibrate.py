"""Calibration statistics against a hand computation from the layer's own routing and experts, and
the refusals of merging and quantising banks they do not express."""

import math

import pytest
import torch

import moekit
from moekit.compress import calibrate
from moekit.compress.merge import merge_groups
from moekit.compress.quantize import QuantizedExpertBank
from moekit.errors import UsageError
from moekit.layers.moe import moe_layers


def _by_hand(model, windows, latent=False):
    """Per layer: (tokens, count_E, gate_sum_E, reap_sum_E) from routing_info().executed and each expert's
    output computed by the bank's grouped forward with every row sent to that expert (`latent`: on the layer's
    latent projection and norm of its input, what its experts read)."""
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
                if latent:
                    x_TD = m.latent_norm(m.fc1_latent_proj(x_TD))
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


def _lm(**moe):
    from moekit.models import LMConfig, MoELM

    cfg = moekit.MoEConfig(d_model=32, d_expert=16, num_experts=8, router=moekit.RouterConfig(kind="topk", k=2), **moe)
    torch.manual_seed(0)
    return MoELM(LMConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, max_seq_len=64, moe=cfg)).eval()


def test_latent_experts_are_calibrated_on_their_latent_input(windows):
    # Before: calibration ran the l-wide experts on the D-wide layer input (a raw matmul shape error), so
    # `moekit compress` crashed on latent layers (the `latent` preset, wrapped Nemotron-H with moe_latent_size).
    model = _lm(latent_dim=8, latent_norm_eps=1e-6)
    cal = calibrate(model, windows, batch_size=3, outputs=True)
    for stats in cal.layers:  # expert outputs in the experts' latent width; the layer's inputs kept as they are
        assert stats.out_sum_ED.shape == (8, 8) and stats.inputs_TD.shape[1] == 32
    for stats, (tokens, count_E, _, reap_E) in zip(cal.layers, _by_hand(model, windows, latent=True), strict=True):
        assert stats.tokens == tokens
        torch.testing.assert_close(stats.count_E, count_E)
        torch.testing.assert_close(stats.reap_E(), reap_E / count_E.clamp(min=1), rtol=1e-4, atol=1e-6)


def test_compressing_latent_layers_runs_and_keeps_the_survivors(windows):
    from moekit.compress import merge, prune, quantize

    model = _lm(latent_dim=16)
    prune(model, calibrate(model, windows), 0.5, "reap")
    assert [m.experts.num_experts for m in moe_layers(model)] == [4, 4]
    result = merge(model, calibrate(model, windows, outputs=True), 0.5, "hc-smoe")
    assert all(math.isfinite(e) for e in result.error_L)  # the layer re-run on its own (D-wide) inputs
    quantize(model, "int8", calibrate(model, windows), 8)
    with torch.no_grad():
        assert torch.isfinite(model(windows)).all()


@pytest.mark.parametrize("moe", [{"zero_experts": 2}, {"copy_experts": 1, "constant_experts": 1}])
def test_zero_computation_experts_are_refused_in_one_line(windows, moe):
    # Before: a raw size-mismatch RuntimeError inside calibration's forward hook (the `moepp` preset, LongCat-Flash).
    with pytest.raises(UsageError, match=r"MoE layer 0 routes to 2 zero-computation experts .* past its 8 experts.*; "
                                         r"expected a layer whose router scores its experts only"):
        calibrate(_lm(**moe), windows)
