"""Each method against its formula on inputs small enough to check by hand.

Shared setting: a 2 -> 2 base layer with W = I and no bias, and two tokens x1 = (1, 1), x2 = (-1, 1).
A gate weight [[2, 0], [0, 0]] gives logits (2, 0) for x1 and (-2, 0) for x2, so softmax gives
p = e^2 / (e^2 + 1) = 0.8808 to the favoured expert and q = 1 - p = 0.1192 to the other.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import moekit
import moekit.adapters as ad
from moekit.adapters.flylora import sparse_projection
from moekit.adapters.loramoe import localized_balance_loss

from .conftest import logits, tiny_llama

P = math.exp(2) / (math.exp(2) + 1)
Q = 1 - P
X = torch.tensor([[1.0, 1.0], [-1.0, 1.0]], dtype=torch.float64)
GATE = torch.tensor([[2.0, 0.0], [0.0, 0.0]], dtype=torch.float64)


def identity_model():
    """A one-layer module whose `proj` is the 2 x 2 identity (float64)."""
    model = nn.Module()
    model.proj = nn.Linear(2, 2, bias=False, dtype=torch.float64)
    with torch.no_grad():
        model.proj.weight.copy_(torch.eye(2))
    return model


def adapted(cfg):
    model = identity_model()
    ad.add_adapters(model, cfg)
    layer = model.proj
    layer.to(torch.float64)
    return model, layer


def test_lora_formula():
    # A = [1, 2], B = [3, 4]^T, s = 2 / 1: y = x + 2 * B (A x); A x1 = 3 -> (1 + 18, 1 + 24)
    model, layer = adapted(ad.LoRAConfig(r=1, lora_alpha=2, target_modules=["proj"]))
    with torch.no_grad():
        layer.lora_A.weight.copy_(torch.tensor([[1.0, 2.0]]))
        layer.lora_B.weight.copy_(torch.tensor([[3.0], [4.0]]))
    y = model.proj(X)
    assert torch.allclose(y[0], torch.tensor([19.0, 25.0], dtype=torch.float64))
    # A x2 = 1 -> (-1 + 6, 1 + 8)
    assert torch.allclose(y[1], torch.tensor([5.0, 9.0], dtype=torch.float64))


def _set_two_experts(layer):
    # expert 0: A = [1, 2], B = [3, 4]^T; expert 1: A = [1, -1], B = [1, 1]^T
    with torch.no_grad():
        layer.lora_A.copy_(torch.tensor([[[1.0, 2.0]], [[1.0, -1.0]]]))
        layer.lora_B.copy_(torch.tensor([[[3.0], [4.0]], [[1.0], [1.0]]]))


@pytest.mark.parametrize("router", [moekit.RouterConfig(kind="topk", k=1), moekit.RouterConfig(kind="topp", p=0.5)])
def test_mixlora_formula(router):
    """top-1 and top-p (p = 0.5 keeps one expert here): the favoured expert with its raw probability.
    x1 -> expert 0: 2 * p * B0 (A0 x1 = 3) = 2p (9, 12); x2 -> expert 1: 2 * p * B1 (A1 x2 = -2) = -4p (1, 1)."""
    model, layer = adapted(ad.MixLoRAConfig(r=1, lora_alpha=2, num_experts=2, router=router, target_modules=["proj"]))
    _set_two_experts(layer)
    with torch.no_grad():
        layer.router.weight.copy_(GATE)
    y = model.proj(X)
    expected = torch.tensor([[1 + 18 * P, 1 + 24 * P], [-1 - 4 * P, 1 - 4 * P]], dtype=torch.float64)
    assert torch.allclose(y, expected, atol=1e-12)
    assert layer.last_counts_E.tolist() == [1, 1]  # one routed row per expert: only routed rows run


def test_mixlora_topk2_formula():
    """k = 2 of 2, renormalised (= the softmax): x2 gets q * 2 * B0 (A0 x2 = 1) + p * 2 * B1 (A1 x2 = -2)."""
    model, layer = adapted(ad.MixLoRAConfig(r=1, lora_alpha=2, num_experts=2,
                                            router=moekit.RouterConfig(kind="topk", k=2), target_modules=["proj"]))
    _set_two_experts(layer)
    with torch.no_grad():
        layer.router.weight.copy_(GATE)
    y = model.proj(X)
    expected_x2 = torch.tensor([-1 + 2 * (3 * Q - 2 * P), 1 + 2 * (4 * Q - 2 * P)], dtype=torch.float64)
    assert torch.allclose(y[1], expected_x2, atol=1e-12)


def test_loramoe_formula_and_localized_balance():
    """Dense gate: x2 -> 2 * (q * B0 (A0 x2 = 1) + p * B1 (A1 x2 = -2)); the constraint on two one-token
    sequences of types (1, 0) with alpha = 0.1: importances (p, q) and (q, p) times coefficients
    (1.1, 0.9) and (0.9, 1.1); cv^2 = unbiased var / mean^2 of those four numbers."""
    model, layer = adapted(ad.LoRAMoEConfig(r=1, lora_alpha=2, num_experts=2, lora_dropout=0.0, blc_alpha=0.1,
                                            blc_weight=0.5, target_modules=["proj"]))
    _set_two_experts(layer)
    with torch.no_grad():
        layer.lora_route.weight.copy_(GATE)
    with ad.task_types(model, torch.tensor([1, 0])):
        y = model.proj(X.view(2, 1, 2)).view(2, 2)
    assert torch.allclose(y[0], torch.tensor([1 + 18 * P, 1 + 24 * P], dtype=torch.float64), atol=1e-6)
    assert torch.allclose(y[1], torch.tensor([-1 + 2 * (3 * Q - 2 * P), 1 + 2 * (4 * Q - 2 * P)],
                                             dtype=torch.float64), atol=1e-6)
    values = [1.1 * P, 0.9 * Q, 0.9 * Q, 1.1 * P]
    mean = sum(values) / 4
    var = sum((v - mean) ** 2 for v in values) / 3
    cv2 = var / (mean**2 + 1e-10)
    assert layer.aux["localized_balance"].item() == pytest.approx(cv2, rel=1e-5)
    assert ad.aux_loss(model).item() == pytest.approx(0.5 * cv2, rel=1e-5)  # blc_weight * cv^2
    # the plain function: an (B=1, T=3, E=4) gate, type 1 favours experts 0-1
    w = torch.tensor([[[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25]]])
    importance = [0.75 * 1.1, 0.75 * 1.1, 0.75 * 0.9, 0.75 * 0.9]
    m = sum(importance) / 4
    expected = sum((v - m) ** 2 for v in importance) / 3 / (m * m + 1e-10)
    assert localized_balance_loss(w, torch.tensor([1]), 0.1).item() == pytest.approx(expected, rel=1e-5)


def test_loramoe_no_types_no_constraint():
    model, layer = adapted(ad.LoRAMoEConfig(r=1, num_experts=2, blc_weight=0.5, target_modules=["proj"]))
    model.proj(X)
    assert layer.aux == {} and float(ad.aux_loss(model)) == 0.0


def test_smora_formula():
    """Two ranks, the router picks one (top-1): x1 -> rank 0, gate p: B (p * A x1 * e0) with A x1 = (3, 0)
    -> p * 3 * (3, 4); x2 -> rank 1, gate p: A x2 = (1, -2) -> p * -2 * (1, 1); s = 2 / 2 = 1."""
    model, layer = adapted(ad.SMoRAConfig(r=2, lora_alpha=2, router=moekit.RouterConfig(kind="topk", k=1),
                                          target_modules=["proj"]))
    with torch.no_grad():
        layer.lora_A.weight.copy_(torch.tensor([[1.0, 2.0], [1.0, -1.0]]))
        layer.lora_B.weight.copy_(torch.tensor([[3.0, 1.0], [4.0, 1.0]]))
        layer.router.weight.copy_(GATE)
    y = model.proj(X)
    expected = torch.tensor([[1 + 9 * P, 1 + 12 * P], [-1 - 2 * P, 1 - 2 * P]], dtype=torch.float64)
    assert torch.allclose(y, expected, atol=1e-12)


def test_flylora_formula_signed_topk_and_bias():
    """A = [[1, 0], [0, 1], [1, 1], [-1, 0]], B = [[1, 2, 3, 4], [0, 1, 0, 1]], k = 2, s = 4 / 4 = 1.
    x = (2, 1): A x = (2, 1, 3, -2), top-2 ranks 2 and 0 -> B (2, 0, 3, 0) = (11, 0).
    x = (-2, 1): A x = (-2, 1, -1, 2): signed top-2 are ranks 3 and 1 (not the magnitudes -2, 2)
    -> B (0, 1, 0, 2) = (10, 3). With bias (0, 0, 0, -5) the picks are ranks 1 and 2 -> B (0, 1, -1, 0)."""
    model, layer = adapted(ad.FlyLoRAConfig(r=4, k=2, lora_alpha=4, target_modules=["proj"]))
    with torch.no_grad():
        layer.lora_A.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]]))
        layer.lora_B.weight.copy_(torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 1.0, 0.0, 1.0]]))
    x = torch.tensor([[2.0, 1.0], [-2.0, 1.0]], dtype=torch.float64)
    y = model.proj(x)
    assert torch.allclose(y - x, torch.tensor([[11.0, 0.0], [10.0, 3.0]], dtype=torch.float64))
    with torch.no_grad():
        layer.lora_topk_bias.copy_(torch.tensor([0.0, 0.0, 0.0, -5.0]))
    y = model.proj(x[1:])
    assert torch.allclose(y - x[1:], torch.tensor([[2.0 - 3.0, 1.0]], dtype=torch.float64))


def test_flylora_bias_update_once_per_step():
    """b_i += u * sign(mean c - c_i) with c the training picks of the step; eval picks do not count."""
    model, layer = adapted(ad.FlyLoRAConfig(r=4, k=2, lora_alpha=4, bias_rate=0.5, target_modules=["proj"]))
    with torch.no_grad():
        layer.lora_A.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]]))
    x = torch.tensor([[2.0, 1.0], [-2.0, 1.0]], dtype=torch.float64)  # picks {2, 0} and {3, 1}
    model.eval()
    model.proj(x)
    assert layer.step_counts_r.sum() == 0
    model.train()
    model.proj(x[:1])  # picks ranks 0 and 2: counts (1, 0, 1, 0), mean 0.5
    ad.after_optimizer_step(model)
    assert layer.lora_topk_bias.tolist() == [-0.5, 0.5, -0.5, 0.5]
    assert layer.step_counts_r.sum() == 0


def test_flylora_sparse_projection():
    """Each row keeps in // (r // k) entries, drawn from N(0, (1/r)^2); A is a buffer, never a parameter."""
    A = sparse_projection(8, 64, 2, torch.Generator().manual_seed(0))
    assert ((A != 0).sum(dim=1) == 64 // 4).all()
    big = sparse_projection(16, 4096, 16, torch.Generator().manual_seed(0))
    assert big[big != 0].std().item() == pytest.approx(1 / 16, rel=0.05)
    model, layer = adapted(ad.FlyLoRAConfig(r=4, k=2, target_modules=["proj"]))
    assert "lora_A" in dict(layer.named_buffers()) and "lora_A" not in dict(layer.named_parameters())


def test_one_expert_top1_mixture_equals_lora(ids):
    """Acceptance: a mixture with one LoRA expert and k = 1 computes that LoRA (the router's single
    probability is exactly 1)."""
    lora_model, mix_model = tiny_llama(), tiny_llama()
    targets = ["q_proj", "v_proj", "down_proj"]
    ad.add_adapters(lora_model, ad.LoRAConfig(r=4, lora_alpha=8, target_modules=targets))
    ad.add_adapters(mix_model, ad.MixLoRAConfig(r=4, lora_alpha=8, num_experts=1, target_modules=targets,
                                                router=moekit.RouterConfig(kind="topk", k=1)))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for (_, lora), (_, mix) in zip(ad.adapter_layers(lora_model), ad.adapter_layers(mix_model), strict=True):
            lora.lora_A.weight.copy_(torch.randn(lora.lora_A.weight.shape, generator=g))
            lora.lora_B.weight.copy_(torch.randn(lora.lora_B.weight.shape, generator=g))
            mix.lora_A[0].copy_(lora.lora_A.weight)
            mix.lora_B[0].copy_(lora.lora_B.weight)
    expected = logits(lora_model, ids)
    assert not torch.allclose(expected, logits(tiny_llama(), ids))
    assert torch.allclose(logits(mix_model, ids), expected, rtol=1e-5, atol=1e-5)
    for _, mix in ad.adapter_layers(mix_model):
        assert mix.last_counts_E.tolist() == [ids.numel()]
