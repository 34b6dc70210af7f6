"""RouterConfig.gate_dtype (every router kind): "float32" (default) runs the gate linear in fp32 whatever the model
dtype; "weight" runs it in the gate weight's dtype and upcasts the logits to fp32 after, as transformers' routers
that call `F.linear(hidden_states, self.weight)` in the model dtype (Mixtral, Qwen3-MoE). In fp32 both are equal."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import moekit
from moekit.errors import UsageError
from moekit.routers import registered_routers
from moekit.routers.base import RouterInputNorm


def _kinds() -> list[str]:
    """Router kinds whose logits are a linear gate of a plain (T, D) input (no routing state, no token ids)."""
    return [kind for kind in registered_routers()
            if not (cfg := moekit.RouterConfig(kind=kind)).carries_state() and not cfg.routes_on_token_ids()]


def _layer(kind: str, gate_dtype: str) -> moekit.MoELayer:
    torch.manual_seed(0)
    router = moekit.RouterConfig(kind=kind, gate_dtype=gate_dtype)
    return moekit.MoELayer(moekit.MoEConfig(d_model=16, d_expert=8, num_experts=8, router=router)).eval()


def _logits(layer: moekit.MoELayer, x_TD: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        layer(x_TD)
    return layer.routing_info().route.logits_TE


@pytest.mark.parametrize("kind", _kinds())
def test_bf16_gate_in_the_weight_dtype_gives_the_bf16_logits_upcast(kind):
    x_TD = torch.randn(12, 16, generator=torch.Generator().manual_seed(1))
    fp32, weight = _layer(kind, "float32"), _layer(kind, "weight")
    assert moekit.RouterConfig(kind=kind).gate_dtype == "float32"  # moekit's own rule stays the default
    assert torch.equal(_logits(fp32, x_TD), _logits(weight, x_TD))  # in fp32 the same
    fp32.to(torch.bfloat16)
    weight.to(torch.bfloat16)
    x_TD = x_TD.to(torch.bfloat16)
    router = weight.router
    w = router.weight if kind != "null" else torch.cat([router.weight, router.null_weight])
    want = torch.nn.functional.linear(x_TD, w, None if router.bias is None
                                      else torch.nn.functional.pad(router.bias, (0, w.shape[0] - router.bias.shape[0])))
    got = _logits(weight, x_TD)  # (T, E): a null router's null columns are not in the route's logits
    assert got.dtype == torch.float32 and torch.equal(got, want.float()[:, :got.shape[1]])
    assert not torch.equal(_logits(fp32, x_TD), got)  # the fp32 gate does not round its logits to bf16


def test_gate_dtype_is_validated_kept_by_a_reroute_and_round_trips():
    with pytest.raises(UsageError, match="RouterConfig.gate_dtype"):
        moekit.RouterConfig(kind="topk", gate_dtype="bfloat16").validate(8)
    cfg = moekit.RouterConfig(kind="topk", gate_dtype="weight")
    assert cfg.convert("topp").gate_dtype == "weight"  # part of the gate, as logit_scale
    assert moekit.RouterConfig.from_dict(cfg.to_dict()) == cfg


def test_an_input_norm_in_the_model_dtype_rounds_as_gemma4():
    """With gate_dtype "weight" the input norm returns the model dtype, then scales in it (transformers'
    Gemma4RMSNorm returns `type_as(hidden_states)`; Gemma4TextRouter multiplies by its scale and D^-0.5 after)."""
    D = 16
    g = torch.Generator().manual_seed(0)
    scale_D = torch.nn.Parameter((1 + 0.3 * torch.randn(D, generator=g)).to(torch.bfloat16))
    norm = RouterInputNorm(scale_D, 1e-6, D**-0.5)
    x_TD = torch.randn(5, D, generator=g).to(torch.bfloat16)
    x32 = x_TD.float()
    normed = (x32 * torch.pow(x32.pow(2).mean(-1, keepdim=True) + 1e-6, -0.5)).type_as(x_TD)
    assert torch.equal(norm(x_TD, in_input_dtype=True), normed * scale_D * D**-0.5)
    assert norm(x_TD).dtype == torch.float32
    layer = _layer("topk", "weight").to(torch.bfloat16)
    layer.router.input_norm = norm
    assert torch.equal(layer.router.gate_input(x_TD), norm(x_TD, in_input_dtype=True))
    layer.router.cfg = dataclasses.replace(layer.router.cfg, gate_dtype="float32")
    assert torch.equal(layer.router.gate_input(x_TD), norm(x_TD))
