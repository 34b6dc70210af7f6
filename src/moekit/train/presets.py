"""Named starting configurations for `moekit train --preset NAME` and `moekit compare`.

All router-family presets share the `tiny` shapes (d_model 128, 4 layers, 8 experts of width 256,
byte tokenizer) and the same training recipe, and spend the same *active* expert width per token at
balance — 2 experts of width F = 256 (2F):

  topk           top-2 of 8, softmax, renormalised                          2 x F
  topp           top-p, p = 0.4 (arXiv 2403.07652), same 8 experts          measured (dynamic)
  null           AdaMoE: 8 real + 8 null experts, top-4 -> 4*8/16 = 2 real   2 x F at balance
  expert_choice  each expert takes 2T/E tokens (not causal: leaks the future) 2 x F
  deepseek       fine-grained 32 experts of F/4, top-6, sigmoid, 4 groups keep 2,
                 aux-loss-free bias, + 1 shared expert of width F/2          6F/4 + F/2 = 2F
  recurrent      RMoE GRU router (gru_dim 64), top-2                        2 x F
  random         SMoE-Dropout: frozen random router, k grows 1 -> 4, inference k = 2
  remoe          ReMoE: ReLU gates, adaptive L1 steers the average to 2 experts   2 x F on average

Layer architectures (MoEConfig options; the same active expert FLOPs per token as top-2):
  coe            Chain-of-Experts CoE-2(1): top-1 per iteration, 2 iterations,   2 x F (the same bank twice)
                 one router per iteration, inner residual (arXiv 2506.18945)
  moepp          MoE++: 8 FFN + 1 zero + 1 copy + 2 constant experts, top-3     3 x 8/12 = 2 x F at balance
                 over 12, gating residual (arXiv 2410.07348)
  latent         latent experts: D -> l = 64 -> D shared projections, 16 experts  4 x F in l = D/2 dims
                 of F in l dims, top-4 (LatentMoE / nemotron_h)                 (+ 2 D l projection)
  pregated       top-2 whose router reads the previous MoE layer's input         2 x F
                 (Pre-gated MoE, arXiv 2308.12066)

Each preset also trains the aux losses its paper used (TrainConfig coefficients; the rest share the
default recipe: Switch balance 0.01, z-loss 1e-3, top-p's dynamic loss 1e-4):
  random    no balance loss, no z-loss (arXiv 2303.01610: the router is frozen, so these losses'
            gradients would only reach the hidden states)
  deepseek  the aux-loss-free selection bias plus the sequence-wise balance loss with a small
            alpha = 1e-4 (DeepSeek-V3, arXiv 2412.19437 §2.1.2), no Switch loss, no z-loss
  remoe     its load-balanced L1 penalty with the adaptive coefficient only (arXiv 2412.14711; the
            reference ReLU router applies no Switch loss and no z-loss)
"""

from __future__ import annotations

import dataclasses

from moekit.config import MoEConfig, RouterConfig
from moekit.models import LMConfig
from moekit.train.trainer import TrainConfig


def _base(router: RouterConfig, **moe_kw) -> LMConfig:
    moe = MoEConfig(**{"d_model": 128, "d_expert": 256, "num_experts": 8, "router": router, **moe_kw})
    # d_ff_dense fixed so that n_dense > 0 costs the same for every router family
    return LMConfig(d_model=128, n_layers=4, n_heads=4, max_seq_len=512, d_ff_dense=512, moe=moe)


def _deepseek() -> LMConfig:
    # DeepSeekMoE (arXiv 2401.06066) fine-grained m = 4 plus a shared expert; V3 routing (arXiv 2412.19437)
    router = RouterConfig(kind="topk", k=6, score="sigmoid", n_group=4, topk_group=2, bias_update_rate=1e-3)
    return _base(router, d_expert=64, num_experts=32, num_shared_experts=1, d_shared=128)


PRESETS = {
    "tiny": lambda: _base(RouterConfig(kind="topp", p=0.4)),  # the main job: dynamic routing
    "topk": lambda: _base(RouterConfig(kind="topk", k=2)),
    "topp": lambda: _base(RouterConfig(kind="topp", p=0.4)),
    "null": lambda: _base(RouterConfig(kind="null", k=4, n_null=8)),
    "expert_choice": lambda: _base(RouterConfig(kind="expert_choice", ec_capacity_factor=2.0, allow_causal_leak=True)),
    "deepseek": _deepseek,
    "recurrent": lambda: _base(RouterConfig(kind="recurrent", k=2, gru_dim=64)),
    "random": lambda: _base(RouterConfig(kind="random", k=2, min_k=1, max_k=4, k_schedule_steps=300)),
    "remoe": lambda: _base(RouterConfig(kind="remoe", k=2)),
    "coe": lambda: _base(RouterConfig(kind="topk", k=1), iterations=2),
    "moepp": lambda: _base(RouterConfig(kind="topk", k=3), zero_experts=1, copy_experts=1, constant_experts=2,
                           gating_residual=True),
    "latent": lambda: _base(RouterConfig(kind="topk", k=4), num_experts=16, latent_dim=64),
    "pregated": lambda: _base(RouterConfig(kind="topk", k=2), pregated=True),
}

TRAIN = TrainConfig(steps=400, micro_batch=16, seq_len=128, lr=3e-3, warmup_steps=40, checkpoint_every=100,
                    eval_tokens=8192)

# The aux-loss recipe of each preset's paper, where it differs from TRAIN's (see the module doc).
LOSS_RECIPES = {
    "random": {"load_balance_coef": 0.0, "z_loss_coef": 0.0},
    "deepseek": {"load_balance_coef": 0.0, "z_loss_coef": 0.0, "seq_balance_coef": 1e-4},
    "remoe": {"load_balance_coef": 0.0, "z_loss_coef": 0.0},
}


def preset(name: str) -> tuple[LMConfig, TrainConfig]:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; available: {sorted(PRESETS)}")
    return PRESETS[name]().validate(), dataclasses.replace(TRAIN, **LOSS_RECIPES.get(name, {}))
