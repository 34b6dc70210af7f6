"""Recurrent router (RMoE, arXiv 2408.06793): the formula, state shapes, gradient flow, selection rules."""

import pytest
import torch
from torch import nn

import moekit
from moekit import MoELayer, RecurrentState


def stack(make_cfg, n_layers=3, H=16, **kw):
    cfg = make_cfg(kind="recurrent", gru_dim=H, **kw)
    layers = nn.ModuleList(MoELayer(cfg) for _ in range(n_layers))
    return layers, nn.GRUCell(H, H)


def run(layers, gru, x):
    state = RecurrentState(gru)
    states = []
    for layer in layers:
        x = layer(x, router_state=state)  # the layer returns y; the next state is in its routing info
        state = layer.routing_info().router_state
        states.append(state.hidden_TR)
    return x, states


def test_first_layer_logits_follow_the_rmoe_formula(make_cfg):
    layers, gru = stack(make_cfg, n_layers=1)
    x = torch.randn(5, 32)
    run(layers, gru, x)
    router = layers[0].router
    r = gru(x @ router.input_proj.T, torch.zeros(5, 16))  # x_1 = W1 h_1;  r_1 = GRU(x_1, r_0 = 0)
    torch.testing.assert_close(layers[0].routing_info().route.logits_TE, r @ router.weight.T)  # W2 r_1


def test_second_layer_uses_first_layers_state(make_cfg):
    layers, gru = stack(make_cfg, n_layers=2)
    x = torch.randn(2, 3, 32)
    y0 = layers[0](x, router_state=RecurrentState(gru))
    state0 = layers[0].routing_info().router_state
    assert state0.hidden_TR.shape == (6, 16) and state0.gru is gru
    layers[1](y0, router_state=state0)
    r1 = gru(y0.reshape(6, 32) @ layers[1].router.input_proj.T, state0.hidden_TR)
    torch.testing.assert_close(layers[1].routing_info().route.logits_TE, r1 @ layers[1].router.weight.T)
    # a different previous state changes the routing of the same input: the state is really used
    layers[1](y0, router_state=RecurrentState(gru))
    assert not torch.allclose(layers[1].routing_info().route.logits_TE, r1 @ layers[1].router.weight.T)


def test_gradient_flows_through_the_gru_across_layers(make_cfg):
    layers, gru = stack(make_cfg, n_layers=3)
    x = torch.randn(8, 32)
    _, states = run(layers, gru, x)
    # the last layer's state depends on the first layer's W1 only through the carried state
    states[-1].sum().backward()
    assert layers[0].router.input_proj.grad is not None and layers[0].router.input_proj.grad.abs().sum() > 0
    assert gru.weight_hh.grad.abs().sum() > 0
    # and the MoE output's loss reaches the GRU through the combine weights
    for p in list(gru.parameters()) + list(layers.parameters()):
        p.grad = None
    y, _ = run(layers, gru, x)
    y.pow(2).sum().backward()
    assert gru.weight_ih.grad.abs().sum() > 0
    assert all(layer.router.weight.grad.abs().sum() > 0 for layer in layers)


@pytest.mark.parametrize("rule,kw", [("topk", {"k": 2}), ("topp", {"p": 0.5, "max_k": 3})])
def test_any_selection_rule(make_cfg, rule, kw):
    layers, gru = stack(make_cfg, select_rule=rule, **kw)
    run(layers, gru, torch.randn(16, 32))
    per_token = layers[0].routing_info().experts_per_token_T
    if rule == "topk":
        assert (per_token == 2).all()
    else:
        assert per_token.min() >= 1 and per_token.max() <= 3
        assert "dynamic" in layers[0].routing_info().aux


def test_overrides_change_the_selection_rule(make_cfg):
    layers, gru = stack(make_cfg, k=1)
    model = nn.Module()
    model.layers = layers
    with moekit.route(model, k=3):
        run(layers, gru, torch.randn(4, 32))
        assert (layers[1].routing_info().experts_per_token_T == 3).all()
    with pytest.raises(ValueError, match="recurrent"):
        with moekit.route(model, kind="topk"):
            pass


def test_missing_state_or_wrong_gru_is_a_clear_error(make_cfg):
    layers, gru = stack(make_cfg, n_layers=1)
    with pytest.raises(ValueError, match="router_state"):
        layers[0](torch.randn(3, 32))
    with pytest.raises(ValueError, match="gru_dim"):
        layers[0](torch.randn(3, 32), router_state=RecurrentState(nn.GRUCell(8, 8)))


def test_other_routers_hand_the_state_on_and_counts(make_cfg):
    state = RecurrentState(nn.GRUCell(16, 16), torch.randn(3, 16))
    layer = MoELayer(make_cfg())
    y = layer(torch.randn(3, 32), router_state=state)
    assert layer.routing_info().router_state is state and y.shape == (3, 32)
    cfg = make_cfg(kind="recurrent", gru_dim=16)
    assert cfg.num_params() == sum(p.numel() for p in MoELayer(cfg).parameters())


def test_a_reroute_of_gru_dim_the_router_cannot_follow_is_refused_before_anything_changes(make_cfg):
    # Before: route(gru_dim=8) on a gru_dim=16 layer was accepted; its next forward failed on the state's width.
    layers, _ = stack(make_cfg, n_layers=1)
    with pytest.raises(ValueError, match=r"route\(\): RouterConfig\(kind='recurrent'\) gru_dim=8: the router's "
                                         r"input_proj and gate are sized for a GRU state of 16; expected gru_dim=16$"):
        moekit.route(layers[0], gru_dim=8)
    assert layers[0].router.cfg.gru_dim == 16
