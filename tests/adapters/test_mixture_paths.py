"""The mixture's ragged grouped path against the plain per-expert formula, forward and backward, with the
grouped kernel and with the loop; only the routed rows reach the experts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import moekit
import moekit.adapters as ad
from moekit.adapters import mixture
from moekit.adapters.reference import mixture_reference
from moekit.ops import grouped

ROUTERS = {
    "topk": moekit.RouterConfig(kind="topk", k=2),
    "topp": moekit.RouterConfig(kind="topp", p=0.3),  # a varying number of experts per token
    "null": moekit.RouterConfig(kind="null", k=2, n_null=4),  # some tokens get no expert at all
    "sigmoid": moekit.RouterConfig(kind="topk", k=3, score="sigmoid"),
    "random": moekit.RouterConfig(kind="random", k=2, min_k=1, max_k=3),  # frozen router, scheduled k
    "expert_choice": moekit.RouterConfig(kind="expert_choice", allow_causal_leak=True),  # 0..E experts a token
}


def _layer(router, E=6, I=32, O=48, r=8):
    model = nn.Module()
    model.proj = nn.Linear(I, O)
    ad.add_adapters(model, ad.MixLoRAConfig(r=r, lora_alpha=16, num_experts=E, router=router, target_modules=["proj"]))
    layer = model.proj
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g))
        for p in layer.router.parameters():  # sharp, independent rows: top-p and null picks vary across tokens
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return layer


@pytest.mark.parametrize("path", ["kernel", "loop"])
@pytest.mark.parametrize("router", list(ROUTERS))
def test_grouped_path_equals_reference(router, path):
    layer = _layer(ROUTERS[router])
    x = torch.randn(40, 32, requires_grad=True)
    with grouped.force(path) as ran:
        delta = layer.delta(x)
    route = layer.router(x.detach())
    assert ran["forward", path] == 2  # the two expert GEMMs (A, then B) ran the requested path
    # the reference reads the same routing, in float64
    A64, B64 = layer.lora_A.detach().double().requires_grad_(), layer.lora_B.detach().double().requires_grad_()
    x64 = x.detach().double().requires_grad_()
    ref = mixture_reference(x64, route.token_idx_N, route.expert_idx_N, route.weight_N.detach().double(), A64, B64,
                            layer.scaling)
    assert torch.allclose(delta.double(), ref, rtol=1e-4, atol=1e-4)
    upstream = torch.randn_like(ref)
    with grouped.force(path) as ran:
        (delta * upstream.float()).sum().backward()
    assert ran["dw", path] == 2 and ran["dx", path] == 2
    (ref * upstream).sum().backward()
    assert torch.allclose(layer.lora_A.grad.double(), A64.grad, rtol=1e-3, atol=1e-3)
    assert torch.allclose(layer.lora_B.grad.double(), B64.grad, rtol=1e-3, atol=1e-3)
    # x's gradient also flows through the router's weights (not in the reference): compare the rest
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_only_routed_rows_reach_the_experts(monkeypatch):
    """The expert GEMMs see N rows (the router's assignments), not T * E; a token that picked only null
    experts gets no update."""
    layer = _layer(ROUTERS["null"])
    x = torch.randn(64, 32)
    rows = []
    real = mixture.grouped_linear

    def spy(x_NI, w, offsets):
        rows.append(x_NI.shape[0])
        return real(x_NI, w, offsets)

    monkeypatch.setattr(mixture, "grouped_linear", spy)
    with torch.no_grad():
        delta = layer.delta(x)
    route = layer.router(x)
    assert rows == [route.num_assignments] * 2 and route.num_assignments < 64 * 2
    unrouted = torch.ones(64, dtype=torch.bool)
    unrouted[route.token_idx_N] = False
    assert unrouted.any(), "the seed should leave some token with only null picks"
    assert (delta[unrouted] == 0).all() and (delta[~unrouted] != 0).any(dim=-1).all()
