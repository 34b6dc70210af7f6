"""Parity of `moekit.MoELayer` with transformers' own MoE blocks on identical weights and inputs.

fp32, CPU. transformers initialises its MoE parameters with torch.empty / zeros, so every HF
parameter is filled from a seeded generator first (a zero router would make every score tie),
then copied into the moekit layer:

  HF block                              moekit layer
  gate.weight (E, D)                    router.weight
  gate.e_score_correction_bias (E,)     router.e_score_correction_bias
  experts.gate_up_proj (E, 2F, D)       experts.gate_up_proj
  experts.down_proj (E, D, F)           experts.down_proj
  shared_expert(s).{gate,up,down}_proj  shared_experts.{gate,up,down}_proj
  shared_expert_gate (Linear(D, 1))     shared_expert_gate
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn
from transformers import DeepseekV3Config, OlmoeConfig, Qwen2MoeConfig
from transformers.integrations.moe import (
    ALL_EXPERTS_FUNCTIONS,
    batched_mm_experts_forward,
    grouped_mm_experts_forward,
)
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE
from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

import moekit
from moekit.ops import grouped
from moekit.ops.reference import ReferenceExperts

TOL = {"atol": 1e-5, "rtol": 1e-5}
GRAD_TOL = {"atol": 1e-4, "rtol": 1e-4}
D = 32
B, T = 2, 7
IMPLS = {"eager": None, "grouped_mm": grouped_mm_experts_forward, "batched_mm": batched_mm_experts_forward}
# moekit's expert GEMMs: the grouped path forced to the kernel or to the loop (so each is compared,
# and the comparison is known to be of that path), or the reference loop (the oracle's experts,
# moekit.ops.reference.ReferenceExperts, in the layer's place of `experts`).
BACKENDS = ["kernel", "loop", "reference"]


def _on_reference(layer: moekit.MoELayer, path: str) -> moekit.MoELayer:
    if path == "reference":
        layer.experts = ReferenceExperts(layer.experts)
    return layer


@contextlib.contextmanager
def _on_path(path: str):
    """Run moekit's grouped GEMMs on `path` inside the block, and check on exit that they did."""
    with (grouped.record() if path == "reference" else grouped.force(path)) as ran:
        yield
    if path == "reference":
        assert not ran
    else:
        assert ran["forward", path] > 0 and {p for _, p in ran} == {path}


# ----------------------------------------------------------------------------------------------- helpers
def _randomize(block: nn.Module, seed: int, router_std: float = 0.2) -> None:
    """Seeded normal init of every HF parameter (router included; its default zeros make ties)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in block.named_parameters():
            std = router_std if name == "gate.weight" else p.shape[-1] ** -0.5
            p.copy_(torch.randn(p.shape, generator=g) * std)


def _copy_weights(layer: moekit.MoELayer, block: nn.Module) -> None:
    with torch.no_grad():
        layer.router.weight.copy_(block.gate.weight)
        if hasattr(block.gate, "e_score_correction_bias"):
            layer.router.e_score_correction_bias.copy_(block.gate.e_score_correction_bias)
        layer.experts.gate_up_proj.copy_(block.experts.gate_up_proj)
        layer.experts.down_proj.copy_(block.experts.down_proj)
        hf_shared = getattr(block, "shared_experts", None) or getattr(block, "shared_expert", None)
        assert (hf_shared is None) == (layer.shared_experts is None)
        if hf_shared is not None:
            for name in ("gate_proj", "up_proj", "down_proj"):
                getattr(layer.shared_experts, name).weight.copy_(getattr(hf_shared, name).weight)
        hf_gate = getattr(block, "shared_expert_gate", None)
        assert (hf_gate is None) == (layer.shared_expert_gate is None)
        if hf_gate is not None:
            layer.shared_expert_gate.weight.copy_(hf_gate.weight)


def _inputs(seed: int = 1) -> torch.Tensor:
    return torch.randn(B, T, D, generator=torch.Generator().manual_seed(seed))


def _by_expert(idx_TK: torch.Tensor, w_TK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Order each token's selection by expert id, so that selections compare as sets."""
    order = idx_TK.argsort(dim=-1)
    return idx_TK.gather(1, order), w_TK.gather(1, order)


def _assert_same_route(layer: moekit.MoELayer, hf_idx_TK: torch.Tensor, hf_w_TK: torch.Tensor) -> None:
    idx, w = layer.routing_info().route.to_padded()
    idx, w = _by_expert(idx, w)
    hf_idx, hf_w = _by_expert(hf_idx_TK, hf_w_TK.detach())
    torch.testing.assert_close(idx, hf_idx, rtol=0, atol=0)
    torch.testing.assert_close(w, hf_w, **TOL)


# ------------------------------------------------------------------------------------------------- OLMoE
def _olmoe(norm: bool, impl: str = "eager", backend: str = "auto", seed: int = 0):
    cfg = OlmoeConfig(hidden_size=D, intermediate_size=64, num_experts=8, num_experts_per_tok=2,
                      norm_topk_prob=norm, experts_implementation=impl)
    block = OlmoeSparseMoeBlock(cfg)
    _randomize(block, seed)
    layer = moekit.MoELayer(moekit.MoEConfig(
        d_model=D, d_expert=64, num_experts=8,
        router=moekit.RouterConfig(kind="topk", k=2, score="softmax", normalize=norm)))
    _copy_weights(layer, block)
    _on_reference(layer, backend)
    return block, layer


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("norm", [False, True], ids=["norm_off", "norm_on"])
def test_olmoe_block_parity(norm, impl, backend):
    block, layer = _olmoe(norm, impl, backend)
    # The setting reaches the dispatch the decorator does at forward time.
    assert block.experts.config._experts_implementation == impl
    assert ALL_EXPERTS_FUNCTIONS.get_interface(block.experts.config._experts_implementation, None) is IMPLS[impl]
    x = _inputs()
    with torch.no_grad():
        ref = block(x)
        hf_logits, hf_w, hf_idx = block.gate(x)
        with _on_path(backend):
            out = layer(x)
    assert out.shape == ref.shape == (B, T, D)
    assert ref.abs().max() > 0.1  # real numbers, not a zero-vs-zero comparison
    torch.testing.assert_close(out, ref, **TOL)
    torch.testing.assert_close(layer.routing_info().route.logits_TE, hf_logits, **TOL)
    _assert_same_route(layer, hf_idx, hf_w)
    # The two settings of norm_topk_prob give different weights, so the comparison above sees it.
    w_sum = hf_w.sum(-1)
    if norm:
        torch.testing.assert_close(w_sum, torch.ones_like(w_sum))
    else:
        assert w_sum.max() < 0.99


@pytest.mark.parametrize("backend", BACKENDS)
def test_olmoe_grad_parity(backend):
    block, layer = _olmoe(norm=True, backend=backend)
    x = _inputs()
    g = torch.randn(B, T, D, generator=torch.Generator().manual_seed(2))
    x_hf, x_mk = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    (block(x_hf) * g).sum().backward()
    with _on_path(backend):
        (layer(x_mk) * g).sum().backward()
    pairs = {
        "router.weight": (layer.router.weight.grad, block.gate.weight.grad),
        "gate_up_proj": (layer.experts.gate_up_proj.grad, block.experts.gate_up_proj.grad),
        "down_proj": (layer.experts.down_proj.grad, block.experts.down_proj.grad),
        "input": (x_mk.grad, x_hf.grad),
    }
    for name, (got, want) in pairs.items():
        assert got is not None and want is not None, name
        assert want.abs().max() > 1e-3, name  # the gradient is really there
        torch.testing.assert_close(got, want, **GRAD_TOL, msg=lambda m, n=name: f"{n}: {m}")


# -------------------------------------------------------------------------------------------- DeepSeek-V3
def _deepseek(impl: str = "eager", backend: str = "auto", seed: int = 3):
    cfg = DeepseekV3Config(hidden_size=D, moe_intermediate_size=16, n_routed_experts=16, num_experts_per_tok=4,
                           n_group=4, topk_group=2, n_shared_experts=1, routed_scaling_factor=2.5,
                           norm_topk_prob=True, experts_implementation=impl)
    assert cfg.n_routed_experts == cfg.num_local_experts == 16
    block = DeepseekV3MoE(cfg)
    _randomize(block, seed)
    with torch.no_grad():
        bias = torch.randn(16, generator=torch.Generator().manual_seed(seed + 100)) * 0.3
        block.gate.e_score_correction_bias.copy_(bias)
    layer = moekit.MoELayer(moekit.MoEConfig(
        d_model=D, d_expert=16, num_experts=16, num_shared_experts=1, d_shared=16 * 1, shared_gate=False,
        router=moekit.RouterConfig(kind="topk", k=4, score="sigmoid", normalize=True, routed_scaling_factor=2.5,
                                   n_group=4, topk_group=2)))
    _copy_weights(layer, block)
    _on_reference(layer, backend)
    return block, layer


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("impl", list(IMPLS))
def test_deepseek_v3_parity(impl, backend):
    block, layer = _deepseek(impl, backend)
    assert block.experts.config._experts_implementation == impl
    x = _inputs()
    with torch.no_grad():
        ref = block(x)
        hf_logits, hf_w, hf_idx = block.gate(x)
        with _on_path(backend):
            out = layer(x)
    assert ref.abs().max() > 0.1
    torch.testing.assert_close(out, ref, **TOL)
    torch.testing.assert_close(layer.routing_info().route.logits_TE, hf_logits, **TOL)
    _assert_same_route(layer, hf_idx, hf_w)
    # Weights come from the unbiased sigmoid scores: renormalised, times the scaling factor.
    torch.testing.assert_close(hf_w.sum(-1), torch.full((B * T,), 2.5))

    # Preconditions that make this test able to fail: the bias and the group limit both change the
    # selection for some token, so a layer that ignored either would not match.
    scores = torch.sigmoid(hf_logits)
    biased = scores + block.gate.e_score_correction_bias
    no_bias = torch.topk(scores, 4, dim=-1).indices.sort(-1).values
    no_groups = torch.topk(biased, 4, dim=-1).indices.sort(-1).values
    chosen = hf_idx.sort(-1).values
    assert (no_bias != chosen).any(dim=-1).any()
    assert (no_groups != chosen).any(dim=-1).any()


def test_deepseek_v3_bias_changes_selection_not_weights():
    block, layer = _deepseek()
    x = _inputs()
    with torch.no_grad():
        layer(x)
        idx_b, w_b = _by_expert(*layer.routing_info().route.to_padded())
        layer.router.e_score_correction_bias.zero_()
        layer(x)
        idx_0, w_0 = _by_expert(*layer.routing_info().route.to_padded())
    changed = (idx_b != idx_0).any(-1)
    assert changed.any()
    # Tokens whose selection is unchanged get identical weights: the bias never enters them.
    torch.testing.assert_close(w_b[~changed], w_0[~changed], **TOL)


# ------------------------------------------------------------------------------------------------ Qwen2-MoE
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm", [False, True], ids=["norm_off", "norm_on"])
def test_qwen2_moe_shared_gate_parity(norm, backend):
    cfg = Qwen2MoeConfig(hidden_size=D, moe_intermediate_size=16, shared_expert_intermediate_size=48,
                         num_experts=8, num_experts_per_tok=2, norm_topk_prob=norm, experts_implementation="eager")
    block = Qwen2MoeSparseMoeBlock(cfg)
    _randomize(block, seed=5)
    layer = moekit.MoELayer(moekit.MoEConfig(
        d_model=D, d_expert=16, num_experts=8, num_shared_experts=1, d_shared=48, shared_gate=True,
        router=moekit.RouterConfig(kind="topk", k=2, score="softmax", normalize=norm)))
    _copy_weights(layer, block)
    _on_reference(layer, backend)
    x = _inputs()
    with torch.no_grad():
        ref = block(x)
        hf_logits, hf_w, hf_idx = block.gate(x.view(-1, D))
        with _on_path(backend):
            out = layer(x)
        gate = torch.sigmoid(block.shared_expert_gate(x))
    # The sigmoid gate really scales the shared expert (neither ~0 nor ~1 everywhere).
    assert 0.05 < gate.min() and gate.max() < 0.95 and gate.max() - gate.min() > 0.1
    torch.testing.assert_close(out, ref, **TOL)
    torch.testing.assert_close(layer.routing_info().route.logits_TE, hf_logits, **TOL)
    _assert_same_route(layer, hf_idx, hf_w)
