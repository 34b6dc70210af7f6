"""moekit.route: inference-time overrides take effect and are undone on exit."""

import pytest
import torch
from torch import nn

import moekit


@pytest.fixture
def model(make_cfg):
    return nn.Sequential(*[moekit.MoELayer(make_cfg(num_experts=8, k=2)) for _ in range(3)]).eval()


def per_token(model):
    return [layer.routing_info().stats()["experts_per_token_mean"] for layer in moekit.moe_layers(model)]


def test_k_override_and_restore(model):
    x = torch.randn(10, 32)
    y0 = model(x)
    with moekit.route(model, k=1):
        model(x)
        assert per_token(model) == [1.0, 1.0, 1.0]
    y1 = model(x)
    torch.testing.assert_close(y0, y1)
    assert per_token(model) == [2.0, 2.0, 2.0]


def test_per_layer_values_and_layer_selection(model):
    x = torch.randn(6, 32)
    with moekit.route(model, k=[4, 3, 1]):
        model(x)
        assert per_token(model) == [4.0, 3.0, 1.0]
    with moekit.route(model, layers=[2], k=5):
        model(x)
        assert per_token(model) == [2.0, 2.0, 5.0]


def test_switch_to_topp_shares_weights_and_restores(model):
    x = torch.randn(20, 32)
    first = moekit.moe_layers(model)[0]
    w = first.router.weight
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with moekit.route(model, kind="topp", p=0.9):
        assert first.router.kind == "topp" and first.router.weight is w
        model(x)
        assert per_token(model)[0] > 2.0  # p = 0.9 over 8 near-uniform experts takes more than 2
    assert first.router.kind == "topk"
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_restored_after_exception_and_invalid_values_change_nothing(model):
    with pytest.raises(RuntimeError):
        with moekit.route(model, k=1):
            raise RuntimeError("boom")
    assert all(layer.router.cfg.k == 2 for layer in moekit.moe_layers(model))
    with pytest.raises(ValueError, match="RouterConfig.k=9"):
        with moekit.route(model, k=[1, 1, 9]):
            pass
    assert all(layer.router.cfg.k == 2 for layer in moekit.moe_layers(model))
    with pytest.raises(ValueError, match="unknown RouterConfig fields"):
        with moekit.route(model, kk=1):
            pass
    with pytest.raises(ValueError, match="got 2 values for 3"):
        with moekit.route(model, k=[1, 2]):
            pass
    with pytest.raises(ValueError, match="out of range"):
        with moekit.route(model, layers=[7], k=1):
            pass
