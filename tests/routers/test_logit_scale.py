"""RouterConfig.logit_scale (every router kind; Muse Spark's router output multiplier): the logits each router
returns are the unscaled ones times the scale, and the selection reads the scaled logits."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import moekit
from moekit.routers import registered_routers


def _kinds() -> list[str]:
    """Router kinds that route a plain (T, D) input on their own (no routing state, no token ids)."""
    out = []
    for kind in registered_routers():
        cfg = moekit.RouterConfig(kind=kind)
        if not cfg.carries_state() and not cfg.routes_on_token_ids():
            out.append(kind)
    return out


@pytest.mark.parametrize("kind", _kinds())
def test_logit_scale_multiplies_every_routers_logits(kind):
    torch.manual_seed(0)
    layer = moekit.MoELayer(moekit.MoEConfig(d_model=16, d_expert=8, num_experts=8,
                                             router=moekit.RouterConfig(kind=kind))).eval()
    x = torch.randn(12, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        layer(x)
        plain = layer.routing_info().route.logits_TE
        layer.router.cfg = dataclasses.replace(layer.router.cfg, logit_scale=3.0)
        layer(x)
        scaled = layer.routing_info().route.logits_TE
    torch.testing.assert_close(scaled, 3.0 * plain)


def test_logit_scale_changes_the_selection_and_is_validated():
    """A sigmoid top-k with a selection bias picks other experts once the logits shrink (the bias then
    weighs more): the scale acts before selection, not only on the returned logits."""
    torch.manual_seed(0)
    cfg = moekit.RouterConfig(kind="topk", k=2, score="sigmoid")
    layer = moekit.MoELayer(moekit.MoEConfig(d_model=16, d_expert=8, num_experts=8, router=cfg)).eval()
    with torch.no_grad():
        layer.router.e_score_correction_bias.copy_(torch.linspace(-0.4, 0.4, 8))
    x = 4 * torch.randn(64, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        layer(x)
        plain = layer.routing_info().route.expert_idx_N.clone()
        layer.router.cfg = dataclasses.replace(cfg, logit_scale=0.05)
        layer(x)
    assert not torch.equal(layer.routing_info().route.expert_idx_N, plain)
    assert "logit_scale=0.05" in layer.router.cfg.describe()
    with pytest.raises(ValueError, match="RouterConfig.logit_scale"):
        moekit.RouterConfig(kind="topk", logit_scale=0.0).validate(8)
    again = moekit.RouterConfig.from_dict(moekit.RouterConfig(kind="topp", p=0.5, logit_scale=0.25).to_dict())
    assert again.logit_scale == 0.25 and again.convert("topk").logit_scale == 0.25  # JSON and re-route keep it
