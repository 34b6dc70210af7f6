"""ReLU routing: ReMoE (Wang, Chen, Zhu, "ReMoE: Fully Differentiable Mixture-of-Experts with ReLU
Routing", arXiv 2412.14711; reference code thu-ml/ReMoE, Megatron-LM's `ReLURouter` and its L1
coefficient update in `megatron/training/training.py`).

Legend: T tokens, V valid tokens, D model dim, E experts, N assignments, L MoE layers.

Stages:
  1. R_TE = ReLU(x W^T)                                     (fp32; the gate values are the weights)
  2. a token uses every expert with R > 0: 0..E experts, a *variable* number per token, and its
     combine weights are the raw gate values (no softmax, no renormalisation); a token with none gets
     zero MoE output. Selection and weights are one continuous function, so the router is fully
     differentiable.
  3. sparsity control (arXiv 2412.14711, adaptive L1 and its load-balanced form): the L1 penalty, times an adaptive coefficient
     lambda, is returned as aux["l1_reg"] (already scaled by lambda; the trainer adds it with
     coefficient 1, `ReMoEConfig.aux_loss_coefs`):
       load-balanced (l1_balance=True, the reference code):
         L_reg = sum_e f_e * mean_t R_te,  f_e = E / (k V) * #{t : R_te > 0}   (f without gradient)
         = Megatron's switch_load_balancing_loss_func(relu, tokens_per_expert, topk=k)
       plain L1 (l1_balance=False):  L_reg = mean_t sum_e R_te
  4. after every optimiser step (`after_optimizer_step_all`, run by moekit.train.balance):
       S = 1 - (active assignments) / (V E), averaged over the model's MoE layers,
       lambda <- lambda * alpha   if S < 1 - k/E   (too dense; per-layer k or E: both sides averaged over layers)
       lambda <- lambda / alpha   otherwise        (arXiv 2412.14711: lambda_{i+1} = lambda_i alpha^sign(...))
     lambda starts at l1_coef_init (1e-8) and alpha = l1_coef_multiplier (1.2), as the reference. The
     average active experts per token, E (1 - S), thus tracks the target k, while each token, and each
     layer, uses as many experts as its gates open.
NOTE (moekit conventions): lambda is one value for all layers, as in the reference (each layer keeps a
copy in its `l1_coef` buffer, so checkpoints restore it); the reference sums the layers' penalties and
averages S over micro-batches, moekit averages both over MoE layers (MoELM.aux_losses) and weights S
by valid tokens within a step: the adaptive lambda absorbs the constant factor L. When S equals the
target exactly, lambda shrinks (the reference's `<`; the paper's sign(0) would keep it).
The common losses of the layer (Switch balance, z-loss) are computed on the ReLU gates like any
router's; the ReMoE recipe trains them with coefficient 0 (the reference ReLU router applies neither).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from moekit.config import RouterConfig, require, setting
from moekit.routers.base import Router, RouterOutput, StepCounts
from moekit.routers.registry import register


@dataclass
class ReMoEConfig(RouterConfig):
    """ReLU routing (arXiv 2412.14711): k is the *target average* of active experts per token (sparsity
    target 1 - k/E); l1_coef_init (lambda_0), l1_coef_multiplier (alpha) of the adaptive L1 coefficient;
    l1_balance: the load-balanced L1 penalty (as the reference code) rather than the plain one."""

    expert_count_fields: ClassVar[tuple[str, ...]] = ("k",)
    kind: str = setting("remoe", "router: how tokens pick experts (moekit info lists them)")
    k: int = setting(2, "target average of active experts per token (ReMoE, arXiv 2412.14711)")
    l1_coef_init: float = setting(1e-8, "initial coefficient lambda_0 of the adaptive L1 penalty")
    l1_coef_multiplier: float = setting(1.2, "alpha: factor by which the L1 coefficient rises or falls each "
                                        "step")
    l1_balance: bool = setting(True, "the load-balanced L1 penalty (as the reference code) rather than the "
                               "plain one")

    router_losses = ("l1_reg",)

    def describe(self) -> str:
        return (f"target k={self.k}, l1_coef_init={self.l1_coef_init:g}, l1_coef_multiplier={self.l1_coef_multiplier}, "
                f"l1_balance={self.l1_balance}")

    def check(self, num_experts: int) -> None:
        require(1 <= self.k <= num_experts, "RouterConfig.k", self.k, f"an integer in [1, num_experts={num_experts}]")
        require(self.l1_coef_init > 0, "RouterConfig.l1_coef_init", self.l1_coef_init, "a float > 0")
        require(self.l1_coef_multiplier > 1, "RouterConfig.l1_coef_multiplier", self.l1_coef_multiplier,
                "a float > 1")

    def expected_experts_per_token(self, num_experts: int) -> float:
        return float(min(self.k, num_experts))  # the average the L1 control steers to; tokens vary

    def aux_loss_coefs(self) -> dict[str, float]:
        return {"l1_reg": 1.0}  # aux["l1_reg"] carries its adaptive coefficient lambda already


@register("remoe", config=ReMoEConfig)
class ReMoERouter(Router):
    fp32_buffers = ("l1_coef",)

    def __init__(self, cfg: ReMoEConfig, d_model: int, num_experts: int):
        super().__init__(cfg, d_model, num_experts)
        # lambda, shared by all layers (one copy each, kept equal); persistent so that resuming continues it.
        self.register_buffer("l1_coef", torch.tensor(cfg.l1_coef_init, dtype=torch.float32))

    def select(self, logits_TE: torch.Tensor, x_TD: torch.Tensor,
               valid_T: torch.Tensor | None = None) -> RouterOutput:
        gates_TE = torch.relu(logits_TE)  # arXiv 2412.14711: R(x) = ReLU(x W^T), the gates are the weights
        token_idx_N, expert_idx_N = (gates_TE > 0).nonzero(as_tuple=True)
        return RouterOutput(token_idx_N, expert_idx_N, gates_TE[token_idx_N, expert_idx_N], gates_TE, logits_TE)

    def aux_losses(self, route: RouterOutput, valid_T: torch.Tensor | None,
                   batch_counts: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        gates_TE = route.scores_TE if valid_T is None else route.scores_TE * valid_T.unsqueeze(-1)
        V = max(route.num_tokens if valid_T is None else int(valid_T.sum()), 1)
        if self.cfg.l1_balance:
            # arXiv 2412.14711, load-balanced L1; the reference: sum_e (sum_t R_te) * count_e * E / (V^2 k)
            counts_E, V_f = route.counts_E(), V
            if batch_counts is not None:  # f over the whole micro-batch (see Router.aux_losses)
                counts_E, V_f = batch_counts[0], max(int(batch_counts[1]), 1)
            f_E = counts_E.to(gates_TE.dtype) * (self.num_experts / (self.cfg.k * V_f))
            penalty = (gates_TE.sum(0) * f_E).sum() / V
        else:
            penalty = gates_TE.sum() / V  # arXiv 2412.14711, plain L1: the mean L1 norm of the gates
        return {"l1_reg": self.l1_coef * penalty}

    @classmethod
    @torch.no_grad()
    def after_optimizer_step_all(cls, routers: list[ReMoERouter], counts: list[StepCounts]) -> None:
        """The reference's update of lambda from the step's sparsity averaged over layers (see the module doc)."""
        routed = [(r, c) for r, c in zip(routers, counts, strict=True) if c.tokens > 0]
        if not routed:
            return  # nothing was routed in training this step
        sparsity = sum(1 - float(c.chosen_E.sum()) / (c.tokens * r.num_experts) for r, c in routed) / len(routed)
        # Each layer's own target 1 - k/E (layers may differ: per-layer configs, fine-grained layers),
        # averaged like the sparsity; with one k for all layers this is the reference's 1 - k/E.
        target = sum(1 - r.cfg.k / r.num_experts for r, _ in routed) / len(routed)
        cfg = routers[0].cfg
        factor = cfg.l1_coef_multiplier if sparsity < target else 1 / cfg.l1_coef_multiplier
        coef = routers[0].l1_coef * factor
        for r in routers:
            r.l1_coef.copy_(coef)
