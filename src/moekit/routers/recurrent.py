"""Recurrent router: RMoE, "Layerwise Recurrent Router for Mixture-of-Experts"
(Qiu et al., arXiv 2408.06793).

Legend: T tokens, D model dim, H GRU hidden size (gru_dim, 256 in the paper), E experts.

One GRU cell is shared by all MoE layers and owned by the model. Layer l has its own
W1^l (D -> H) and W2^l (H -> E):
    x_l = W1^l h_l;   r_l = GRU(x_l, r_{l-1}), r_0 = 0;   logits_l = W2^l r_l      (arXiv 2408.06793 §3)
then the usual selection rule (`select_rule`: top-k or top-p) on the logits. The state r is per
token over depth, so it needs no KV-cache entry; it passes to the next layer without detach so
that gradients flow through the GRU across layers.

The model passes the state explicitly: `y, state = moe_layer(x, router_state=state)`, starting
from `RecurrentState(model.router_gru)`. Nothing is kept in globals or on the module.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moekit.config import RouterConfig
from moekit.routers.base import Router, RouterOutput, register, warn_if_k1_normalized
from moekit.routers.topk import select_topk
from moekit.routers.topp import dynamic_loss, select_topp


@dataclass(frozen=True)
class RecurrentState:
    """The routing state carried from one MoE layer to the next: the shared GRU cell and the last
    layer's GRU output r_{l-1} per token (None = r_0 = 0, before the first MoE layer)."""

    gru: nn.GRUCell
    hidden_TH: torch.Tensor | None = None


@register("recurrent")
class RecurrentRouter(Router):
    def __init__(self, cfg: RouterConfig, d_model: int, num_experts: int):
        super().__init__(cfg, d_model, num_experts)
        H = cfg.gru_dim
        self.input_proj = nn.Parameter(torch.empty(H, d_model))  # W1 (H, D)
        self.weight = nn.Parameter(torch.empty(num_experts, H))  # W2 (E, H): the gate proper
        nn.init.normal_(self.input_proj, std=d_model**-0.5)
        nn.init.normal_(self.weight, std=H**-0.5)

    @classmethod
    def check_config(cls, cfg: RouterConfig, num_experts: int) -> None:
        if cfg.select_rule == "topk" and cfg.k > num_experts:
            raise ValueError(f"RouterConfig.k={cfg.k} is invalid; allowed: an integer in [1, num_experts={num_experts}]")
        if cfg.select_rule == "topp" and cfg.score != "softmax":
            raise ValueError(f"RouterConfig.score={cfg.score!r} is invalid with select_rule='topp'; allowed: 'softmax'")
        if cfg.n_group > 1:
            raise ValueError(f"RouterConfig.n_group={cfg.n_group} is invalid for kind='recurrent'; allowed: 1")
        if cfg.select_rule == "topk":
            warn_if_k1_normalized(cfg)

    def forward(self, x_TD: torch.Tensor, state: RecurrentState | None = None,
                valid_T: torch.Tensor | None = None) -> RouterOutput:
        """valid_T is unused: top-k and top-p pick per token, so padding cannot change other tokens'
        experts (the layer drops padding assignments afterwards)."""
        if state is None:
            raise ValueError("recurrent router: pass router_state=RecurrentState(gru) (the GRU cell shared by all "
                             "MoE layers, owned by the model) and feed each layer's returned state to the next")
        if self.training and self.cfg.jitter > 0:
            eps = self.cfg.jitter
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1.0 - eps, 1.0 + eps)
        gru = state.gru
        if gru.input_size != self.cfg.gru_dim or gru.hidden_size != self.cfg.gru_dim:
            raise ValueError(f"recurrent router: the shared GRU is {gru.input_size}->{gru.hidden_size}, "
                             f"but RouterConfig.gru_dim={self.cfg.gru_dim}")
        # NOTE: gate math in fp32 whatever the model dtype (docs/routing.md, Precision), the GRU included.
        xin_TH = torch.nn.functional.linear(x_TD.float(), self.input_proj.float())
        r_prev_TH = state.hidden_TH if state.hidden_TH is not None else xin_TH.new_zeros(xin_TH.shape)
        if r_prev_TH.shape != xin_TH.shape:
            raise ValueError(f"recurrent router: state has shape {tuple(r_prev_TH.shape)}, expected "
                             f"{tuple(xin_TH.shape)} (one GRU state per token)")

        def fp32(p):
            return None if p is None else p.float()

        r_TH = torch.gru_cell(xin_TH, r_prev_TH.float(), gru.weight_ih.float(), gru.weight_hh.float(),
                              fp32(gru.bias_ih), fp32(gru.bias_hh))
        logits_TE = torch.nn.functional.linear(r_TH, self.weight.float())
        if self.cfg.select_rule == "topp":
            route = select_topp(logits_TE, self.cfg)
        else:
            route = select_topk(logits_TE, self.cfg)
        route.state_TH = r_TH
        return route

    def aux_losses(self, route: RouterOutput, valid_T: torch.Tensor | None) -> dict[str, torch.Tensor]:
        if self.cfg.select_rule == "topp":
            return {"dynamic": dynamic_loss(route.scores_TE, valid_T)}
        return {}

    @classmethod
    def aux_loss_names(cls, cfg: RouterConfig) -> tuple[str, ...]:
        return ("dynamic",) if cfg.select_rule == "topp" else ()
