"""Activation checkpointing (issue 11, item 11): no checkpointing, use_reentrant=False and use_reentrant=True
give the same expert counts, selection-bias update and aux-loss gradients.

With use_reentrant=True the forward runs without autograd and is recomputed inside backward, so the aux
losses must reach the optimiser through the layer output (`moekit.attach_aux_losses`); the recompute is the
pass that counts.
"""

import warnings

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import moekit
from moekit.routers import base

COEFS = {"load_balance": 0.1, "z_loss": 0.01, "seq_balance": 0.1}
MODES = ["none", "non_reentrant", "reentrant"]


def make_model(scope: str, n_layers: int) -> nn.Module:
    torch.manual_seed(0)
    cfg = moekit.MoEConfig(d_model=16, d_expert=8, num_experts=4, balance_scope=scope,
                           router=moekit.RouterConfig(k=2, score="sigmoid", bias_update_rate=1e-3))
    return nn.Sequential(*[moekit.MoELayer(cfg) for _ in range(n_layers)])


def train_step(mode: str, attach: bool, scope: str = "micro", n_layers: int = 1, coefs=COEFS):
    """Two micro-batches of one optimiser step; returns counts, gradients, aux values and the new biases."""
    model = make_model(scope, n_layers)
    layers = moekit.moe_layers(model)
    tracker = moekit.BalanceTracker(model)
    if attach:
        moekit.attach_aux_losses(model, coefs)
    g = torch.Generator().manual_seed(1)
    for _ in range(2):
        x = torch.randn(2, 6, 16, generator=g).requires_grad_()
        grad_y = torch.randn(2, 6, 16, generator=g)
        y = model(x) if mode == "none" else checkpoint(model, x, use_reentrant=mode == "reentrant")
        loss = (y * grad_y).sum()
        if not attach:  # the trainer's way: aux losses added to the loss, averaged over layers
            aux = [layer.routing_info().aux for layer in layers]
            loss = loss + sum(c * sum(a[n] for a in aux) / len(aux) for n, c in coefs.items() if n in aux[0])
        loss.backward()
    counts = torch.stack([tracker.counts(layer).executed_E for layer in layers])
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    aux = {n: float(v.detach()) for n, v in layers[-1].routing_info().aux.items()}
    moekit.after_optimizer_step(model)
    bias = torch.stack([layer.router.e_score_correction_bias.clone() for layer in layers])
    return counts, grads, aux, bias


@pytest.mark.parametrize("scope", ["micro", "global"])
@pytest.mark.parametrize("mode", MODES)
def test_every_checkpointing_mode_gives_the_same_step(mode, scope):
    # two MoE layers inside one checkpointed region: each counts its own recompute
    ref_counts, ref_grads, ref_aux, ref_bias = train_step("none", attach=False, scope=scope, n_layers=2)
    assert int(ref_counts.sum()) == 2 * 2 * 12 * 2  # 2 layers x 2 micro-batches x 12 tokens x k = 2
    assert ref_bias.abs().sum() > 0 and set(ref_aux) == set(COEFS)
    for attach in ([False, True] if mode != "reentrant" else [True]):
        counts, grads, aux, bias = train_step(mode, attach, scope, n_layers=2)
        assert torch.equal(counts, ref_counts), (mode, attach)
        assert torch.equal(bias, ref_bias), (mode, attach)
        assert aux == pytest.approx(ref_aux, rel=1e-6)
        assert grads.keys() == ref_grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(grad, ref_grads[name], rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_the_aux_gradient_is_really_there():
    """The comparison above can fail: without aux losses the router gradient differs."""
    _, with_aux, _, _ = train_step("none", attach=True)
    _, without, _, _ = train_step("none", attach=True, coefs={})
    diff = (with_aux["0.router.weight"] - without["0.router.weight"]).abs().max()
    assert diff > 1e-3


def test_reentrant_without_attached_losses_counts_right_and_warns(monkeypatch):
    monkeypatch.setattr(base, "_WARNED", set())
    ref_counts, ref_grads, _, ref_bias = train_step("none", attach=False)
    with pytest.warns(UserWarning, match="attach_aux_losses"):
        counts, grads, _, bias = train_step("reentrant", attach=False)
    assert torch.equal(counts, ref_counts) and torch.equal(bias, ref_bias)  # counts and bias still right
    assert not torch.allclose(grads["0.router.weight"], ref_grads["0.router.weight"])  # aux gradient missing


def test_no_grad_forwards_in_training_mode_count_nothing():
    model = make_model("global", 1)
    layer = model[0]
    tracker = moekit.BalanceTracker(model)
    with torch.no_grad():
        model(torch.randn(2, 6, 16))
    assert not tracker.counts(layer).executed_E.any() and tracker.global_counts(layer)[1] == 0
    moekit.after_optimizer_step(model)
    assert not layer.router.e_score_correction_bias.any()


def test_attach_aux_losses_validates_detaches_and_scales():
    model = make_model("micro", 2)
    with pytest.raises(ValueError, match=r"unknown aux losses \['load_balanse'\]"):
        moekit.attach_aux_losses(model, {"load_balanse": 0.1})
    with pytest.raises(ValueError, match="contains no MoELayer"):
        moekit.attach_aux_losses(nn.Linear(2, 2), COEFS)
    layers = moekit.attach_aux_losses(model, COEFS)
    assert layers[0].aux_loss_coefs == {n: c / 2 for n, c in COEFS.items()}  # a mean over 2 MoE layers
    model(torch.randn(2, 6, 16))
    assert not layers[0].routing_info().aux["load_balance"].requires_grad  # values for logging only
    moekit.attach_aux_losses(model, None)
    model(torch.randn(2, 6, 16))
    assert layers[0].routing_info().aux["load_balance"].requires_grad
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.eval()(torch.randn(2, 6, 16))  # eval: nothing attached, nothing warned


def test_attached_aux_losses_reach_torch_func_grad():
    """`attach_aux_losses`' autograd Function works under torch.func.grad (forward and setup_context apart; before:
    "must override the setup_context staticmethod"): the gradient is autograd's, aux losses included."""
    model = make_model("micro", 2)
    moekit.attach_aux_losses(model, COEFS)
    x = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(1))
    params = {n: p.detach() for n, p in model.named_parameters()}
    got = torch.func.grad(lambda p: torch.func.functional_call(model, p, (x,)).square().sum())(params)
    model(x).square().sum().backward()
    assert set(got) == {n for n, p in model.named_parameters() if p.grad is not None}
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, atol=1e-6, rtol=1e-5, msg=n)
