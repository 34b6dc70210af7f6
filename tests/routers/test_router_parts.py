"""A pretrained router's input norm and per-expert weight scale (transformers' Gemma 4 router), on every router
kind that reads the token: the gate reads the normed input, each pick's weight is times its expert's scale, and
`adopt` (moekit.route(kind=...)) keeps both."""

from __future__ import annotations

import pytest
import torch

import moekit
from moekit.config import RouterConfig
from moekit.routers import router_class
from moekit.routers.base import RouterInputNorm

D, E, T = 16, 6, 24
KINDS = [k for k in moekit.registered_routers() if k != "recurrent"]  # recurrent: its gate reads a GRU state


def _routers(kind: str):
    torch.manual_seed(0)
    cfg = RouterConfig(kind=kind, **({"vocab_size": 50} if kind == "hash" else {})).validate(E)
    plain = router_class(kind)(cfg, D, E).eval()
    parted = router_class(kind)(cfg, D, E).eval()
    parted.load_state_dict(plain.state_dict())
    parted.input_norm = RouterInputNorm(torch.nn.Parameter(1 + 0.3 * torch.randn(D)), 1e-6, D**-0.5)
    parted.expert_scale = torch.nn.Parameter(1 + 0.5 * torch.rand(E))
    return plain, parted


def _route(router, x_TD, seed=1):
    state = torch.randint(0, 50, (T,), generator=torch.Generator().manual_seed(2)) if router.kind == "hash" else None
    torch.manual_seed(seed)  # the random router draws its logits
    return router(x_TD, state=state)


@pytest.mark.parametrize("kind", KINDS)
def test_input_norm_and_expert_scale_apply_to_every_router(kind):
    plain, parted = _routers(kind)
    x_TD = torch.randn(T, D, generator=torch.Generator().manual_seed(0))
    want = _route(plain, parted.input_norm(x_TD))
    got = _route(parted, x_TD)
    # the reference: RMS norm, the learned (D,) scale, D^-0.5; then the rule; then the scale of each pick's expert
    ref_TD = x_TD / (x_TD.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt() * parted.input_norm.scale * D**-0.5
    torch.testing.assert_close(parted.input_norm(x_TD), ref_TD, atol=1e-6, rtol=1e-6)
    assert torch.equal(got.token_idx_N, want.token_idx_N) and torch.equal(got.expert_idx_N, want.expert_idx_N)
    torch.testing.assert_close(got.weight_N, want.weight_N * parted.expert_scale[want.expert_idx_N].detach())
    torch.testing.assert_close(got.logits_TE, want.logits_TE)
    assert not torch.equal(got.weight_N, want.weight_N)


@pytest.mark.parametrize("kind", ["topp", "null", "expert_choice"])
def test_adopt_keeps_the_pretrained_parts(kind):
    _, parted = _routers("topk")
    cfg = parted.cfg.convert(kind, **({"p": 0.5} if kind == "topp" else {}))
    new = router_class(kind)(cfg, D, E)
    new.adopt(parted)
    assert new.input_norm is parted.input_norm and new.expert_scale is parted.expert_scale


def test_prune_keeps_the_kept_experts_scales():
    from moekit.compress.prune import apply_keep

    layer = moekit.MoELayer(moekit.MoEConfig(d_model=D, d_expert=8, num_experts=E, router=RouterConfig(kind="topk", k=2)))
    layer.router.input_norm = RouterInputNorm(torch.nn.Parameter(torch.ones(D)), 1e-6)
    layer.router.expert_scale = torch.nn.Parameter(torch.arange(E, dtype=torch.float32))
    apply_keep(layer, [1, 3, 4])
    assert layer.router.expert_scale.tolist() == [1.0, 3.0, 4.0] and layer.router.input_norm is not None
    assert layer.cfg.num_experts == 3
