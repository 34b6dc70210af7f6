"""Recurrent router: RMoE, "Layerwise Recurrent Router for Mixture-of-Experts"
(Qiu et al., arXiv 2408.06793).

Legend: T tokens, D model dim, R recurrent state size (GRU hidden size gru_dim; 256 in the paper), E experts.

One GRU cell is shared by all MoE layers and owned by the model. Layer l has its own
W1^l (D -> R) and W2^l (R -> E):
    x_l = W1^l h_l;   r_l = GRU(x_l, r_{l-1}), r_0 = 0;   logits_l = W2^l r_l      (arXiv 2408.06793 §3)
then the usual selection rule (`select_rule`: top-k or top-p) on the logits. The state r is per
token over depth, so it needs no KV-cache entry; it passes to the next layer without detach so
that gradients flow through the GRU across layers.

The model passes the state explicitly: `y = moe_layer(x, router_state=state)`, then
`state = moe_layer.routing_info().router_state`, starting from `cfg.initial_state(gru)` =
`RecurrentState(gru)` with the GRU the model owns (`cfg.build_shared_module()`). Nothing is kept in
globals or on the module.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from moekit import losses
from moekit.config import RouterConfig, require, setting
from moekit.errors import UsageError
from moekit.routers.base import RouteExtras, Router, RouterOutput, warn_if_k1_normalized
from moekit.routers.registry import register
from moekit.routers.topk import SCORES, select_topk
from moekit.routers.topp import check_topp_fields, dynamic_loss, select_topp

SELECT_RULES = ("topk", "topp")


@dataclass(frozen=True)
class RecurrentState:
    """The routing state carried from one MoE layer to the next: the shared GRU cell and the last
    layer's GRU output r_{l-1} per token (None = r_0 = 0, before the first MoE layer)."""

    gru: nn.GRUCell
    hidden_TR: torch.Tensor | None = None


@dataclass
class RecurrentConfig(RouterConfig):
    """RMoE (arXiv 2408.06793): gru_dim (hidden size of the GRU shared by all layers), select_rule
    ("topk"|"topp": the selection applied to the GRU's logits, with that rule's own fields: k, score,
    normalize, routed_scaling_factor for top-k; p, min_k, max_k, normalize for top-p)."""

    expert_count_fields: ClassVar[tuple[str, ...]] = ("k", "min_k", "max_k")
    kind: str = setting("recurrent", "router: how tokens pick experts (moekit info lists them)")
    gru_dim: int = setting(256, "hidden size of the GRU shared by all layers (RMoE, arXiv 2408.06793)")
    select_rule: str = setting("topk", "selection applied to the GRU's logits", choices=SELECT_RULES)
    k: int = setting(2, "experts per token (select_rule topk)")
    score: str = setting("softmax", "router score function (select_rule topk)", choices=SCORES)
    normalize: bool | None = setting(None, "renormalise the chosen experts' weights (None = the selection "
                                           "rule's default)")
    routed_scaling_factor: float = setting(1.0, "multiply the routed experts' weights by this (select_rule "
                                                "topk)")
    p: float = setting(0.4, "cumulative-probability threshold (select_rule topp)")
    min_k: int = setting(1, "fewest experts per token (select_rule topp)")
    max_k: int | None = setting(None, "most experts per token (select_rule topp; None = no cap)")

    router_losses = ("dynamic",)

    def normalizes(self) -> bool:
        if self.select_rule == "topp":
            return bool(self.normalize)
        return self.normalize if self.normalize is not None else self.k > 1

    def score_function(self) -> str:
        return self.score

    def describe(self) -> str:
        return f"gru_dim={self.gru_dim}, select_rule={self.select_rule}, {self.convert(self.select_rule).describe()}"

    def check(self, num_experts: int) -> None:
        E = num_experts
        require(self.gru_dim >= 1, "RouterConfig.gru_dim", self.gru_dim, "an integer >= 1")
        require(self.select_rule in SELECT_RULES, "RouterConfig.select_rule", self.select_rule,
                f"one of {SELECT_RULES}")
        require(self.score in SCORES, "RouterConfig.score", self.score, f"one of {SCORES}")
        require(self.routed_scaling_factor > 0, "RouterConfig.routed_scaling_factor", self.routed_scaling_factor,
                "a float > 0")
        check_topp_fields(self, E)
        if self.select_rule == "topk":
            require(1 <= self.k <= E, "RouterConfig.k", self.k, f"an integer in [1, num_experts={E}]")
            warn_if_k1_normalized(self)
        elif self.score != "softmax":
            raise ValueError(f"RouterConfig.score={self.score!r} is invalid with select_rule='topp'; allowed: 'softmax'")

    def num_params(self, d_model: int, num_experts: int) -> int:
        # per-layer W1 (d -> gru_dim) and W2 (gru_dim -> E); the shared GRU belongs to the model
        return self.gru_dim * (d_model + num_experts)

    def expected_experts_per_token(self, num_experts: int) -> float:
        if self.select_rule == "topp":
            return float(self.max_k or num_experts)
        return float(min(self.k, num_experts))

    def min_resident_experts(self, num_experts: int) -> int:
        if self.select_rule == "topp":
            return max(1, min(self.max_k or self.min_k, num_experts))
        return max(1, math.ceil(self.expected_experts_per_token(num_experts)))

    def fixed_experts_per_token(self) -> bool:
        return self.select_rule == "topk"

    def check_expert_mask(self, mask_E) -> None:
        raise ValueError(f"router kind {self.kind!r}, which computes its logits in its own forward, so expert masks "
                         "would not be applied; allowed: routers built on Router.forward")

    def carries_state(self) -> bool:
        return True

    def build_shared_module(self) -> nn.Module:
        return nn.GRUCell(self.gru_dim, self.gru_dim)

    def shared_module_params(self) -> int:
        return 6 * self.gru_dim * (self.gru_dim + 1)  # GRUCell: W_ih, W_hh (3H, H) and two biases (3H)

    def initial_state(self, shared) -> RecurrentState:
        return RecurrentState(shared)

    def aux_loss_names(self) -> tuple[str, ...]:
        return ("dynamic",) if self.select_rule == "topp" else ()


@register("recurrent", config=RecurrentConfig)
class RecurrentRouter(Router):
    def __init__(self, cfg: RecurrentConfig, d_model: int, num_experts: int):
        super().__init__(cfg, d_model, num_experts)
        R = cfg.gru_dim
        self.input_proj = nn.Parameter(torch.empty(R, d_model))  # W1 (R, D)
        self.weight = nn.Parameter(torch.empty(num_experts, R))  # W2 (E, R): the gate proper
        nn.init.normal_(self.input_proj, std=d_model**-0.5)
        nn.init.normal_(self.weight, std=R**-0.5)

    def check_reroute(self, cfg: RecurrentConfig) -> None:
        """input_proj (R, D) and the gate (E, R) are sized by gru_dim at construction: it cannot change under them."""
        R = self.input_proj.shape[0]
        if cfg.gru_dim != R:
            raise UsageError(f"RouterConfig(kind='recurrent') gru_dim={cfg.gru_dim}: the router's input_proj and gate "
                             f"are sized for a GRU state of {R}; expected gru_dim={R}")

    def adopt(self, old: Router) -> None:
        raise ValueError("a recurrent router's gate reads the GRU state, not the token: it cannot take over "
                         f"another router's gate ({old.kind!r})")

    def forward(self, x_TD: torch.Tensor, valid_T: torch.Tensor | None = None,
                state: RecurrentState | None = None) -> RouterOutput:
        """valid_T is unused: top-k and top-p pick per token, so padding cannot change other tokens'
        experts (the layer drops padding assignments afterwards)."""
        if state is None:
            raise ValueError("recurrent router: pass router_state=RecurrentState(gru) (the GRU cell shared by all "
                             "MoE layers, owned by the model) and feed each layer's returned state to the next")
        x_TD = self.jittered(x_TD)
        gru = state.gru
        if gru.input_size != self.cfg.gru_dim or gru.hidden_size != self.cfg.gru_dim:
            raise ValueError(f"recurrent router: the shared GRU is {gru.input_size}->{gru.hidden_size}, "
                             f"but RouterConfig.gru_dim={self.cfg.gru_dim}")
        # NOTE: gate math in fp32 whatever the model dtype (docs/routing.md, Precision), the GRU included.
        xin_TR = torch.nn.functional.linear(x_TD.float(), self.input_proj.float())
        r_prev_TR = state.hidden_TR if state.hidden_TR is not None else xin_TR.new_zeros(xin_TR.shape)
        if r_prev_TR.shape != xin_TR.shape:
            raise ValueError(f"recurrent router: state has shape {tuple(r_prev_TR.shape)}, expected "
                             f"{tuple(xin_TR.shape)} (one GRU state per token)")

        def fp32(p):
            return None if p is None else p.float()

        r_TR = torch.gru_cell(xin_TR, r_prev_TR.float(), gru.weight_ih.float(), gru.weight_hh.float(),
                              fp32(gru.bias_ih), fp32(gru.bias_hh))
        logits_TE = self.scaled(torch.nn.functional.linear(r_TR, self.weight.float()))
        cfg = self.cfg
        if cfg.select_rule == "topp":
            route = select_topp(logits_TE, cfg.p, cfg.min_k, cfg.max_k, cfg.normalizes())
        else:
            route = select_topk(logits_TE, cfg.k, cfg.score, cfg.normalizes(), cfg.routed_scaling_factor)
        return dataclasses.replace(route, extras=RouteExtras(state=RecurrentState(gru, r_TR)))

    def aux_losses(self, route: RouterOutput, valid_T: torch.Tensor | None,
                   batch_counts: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        if self.cfg.select_rule == "topp":
            return {"dynamic": dynamic_loss(route.scores_TE, valid_T)}
        return {}

    def balance_probs(self, route: RouterOutput) -> torch.Tensor:
        # P averages probabilities: sigmoid (and sqrt-softplus) scores are normalised per token first (Megatron-LM).
        return losses.token_normalized(route.scores_TE) if self.cfg.score != "softmax" else route.scores_TE
