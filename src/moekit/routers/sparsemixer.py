"""SparseMixer routing: Phi-3.5-MoE / GRIN-MoE (arXiv 2409.12136; SparseMixer, arXiv 2310.00811).

Legend: T tokens, D model dim, E experts, K experts per token.

Experts are picked one at a time from the router logits s_TE, each pick among the experts not yet
picked (pick 1 among all; pick j > 1 with the earlier picks' logits set to -inf):
  1. m = the largest remaining logit; an expert takes part in this pick when its logit is within a
     relative band of it: (m - s_e) / max(|s_e|, m) <= 2 * jitter_eps, the others are set to -inf
  2. the pick: in evaluation, the expert of logit m; in training, a Gumbel-max sample from the
     remaining logits (argmax(s - log(Exp(1))))
  3. its weight: the softmax over the remaining logits, at the picked expert (no renormalisation
     over the picks)
  4. training only (Heun's third-order method): the weight's value is multiplied by 1 when the sample
     is the pick's argmax or with probability 1/4 otherwise, else by 1/3; its gradient is that of the
     softmax weight of step 3 with respect to the logits, whatever the factor (a straight-through
     estimate, as the reference's `PhimoeMultiplier` backward).
The reference (transformers' `modeling_phimoe.sparsemixer`, from microsoft/GRIN-MoE) hard-codes two
picks; moekit repeats pick 2 for k > 2 (k = 2 is the reference exactly, k = 1 its first pick). Its random
draws are made in the reference's order (per pick: exponential noise (T, E), then the coin (T, 1),
drawn twice at picks > 1 as the reference's `rand_like(...).uniform_()` does), so that a seeded training
step picks what the reference picks.
`scores_TE` (for the balance losses and analysis) is the softmax of the logits over all experts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from moekit.config import RouterConfig, require, setting
from moekit.routers.base import Router, RouterOutput
from moekit.routers.registry import register


@dataclass
class SparseMixerConfig(RouterConfig):
    """SparseMixer (Phi-3.5-MoE's router, arXiv 2409.12136): k experts picked one at a time, each among the
    experts whose logit is within a relative band 2 * jitter_eps of the best remaining one (see the module
    doc). jitter_eps is transformers' PhimoeConfig.router_jitter_noise (0.01)."""

    expert_count_fields: ClassVar[tuple[str, ...]] = ("k",)
    kind: str = setting("sparsemixer", "router: how tokens pick experts (moekit info lists them)")
    k: int = setting(2, "experts per token, picked one at a time (Phi-3.5-MoE: 2)")
    jitter_eps: float = setting(0.01, "relative band around the best remaining logit that takes part in a "
                                "pick's softmax: (max - s) / max(|s|, max) <= 2 * jitter_eps")

    def describe(self) -> str:
        return f"k={self.k}, sparsemixer eps={self.jitter_eps:g}"

    def check(self, num_experts: int) -> None:
        require(1 <= self.k <= num_experts, "RouterConfig.k", self.k, f"an integer in [1, num_experts={num_experts}]")
        require(self.jitter_eps >= 0, "RouterConfig.jitter_eps", self.jitter_eps, "a float >= 0")

    def expected_experts_per_token(self, num_experts: int) -> float:
        return float(min(self.k, num_experts))

    def fixed_experts_per_token(self) -> bool:
        return True

    def min_enabled_experts(self) -> int:
        return self.k

    def hf_routing(self) -> dict[str, Any] | None:
        return None  # export writes Mixtral / Qwen3-MoE / GLM-4-MoE checkpoints, none of which routes this way


@register("sparsemixer", config=SparseMixerConfig)
class SparseMixerRouter(Router):
    def select(self, logits_TE: torch.Tensor, x_TD: torch.Tensor,
               valid_T: torch.Tensor | None = None) -> RouterOutput:
        idx_TK, w_TK = sparsemixer(logits_TE, self.cfg.k, self.cfg.jitter_eps, self.training)
        return RouterOutput.from_topk(idx_TK, w_TK, torch.softmax(logits_TE, dim=-1), logits_TE)


def sparsemixer(logits_TE: torch.Tensor, k: int, jitter_eps: float,
                training: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseMixer's picks (T, K) int64 and weights (T, K) fp32 from fp32 logits (module doc). Disabled
    experts (-inf logits) are never picked while another expert remains."""
    idx, weights = [], []
    remaining_TE = logits_TE
    for j in range(k):
        if j:
            remaining_TE = remaining_TE.scatter(-1, idx[-1], float("-inf"))
        with torch.no_grad():
            max_T1, argmax_T1 = remaining_TE.max(dim=-1, keepdim=True)
            # arXiv 2409.12136: the band is relative to the larger of |s_e| and the remaining maximum.
            factor_TE = logits_TE.abs().clamp(min=max_T1)
            outside_TE = ((max_T1 - logits_TE) / factor_TE) > (2 * jitter_eps)
        masked_TE = remaining_TE.masked_fill(outside_TE, float("-inf"))
        if training:
            # Gumbel-max sampling among the experts in the band (the reference: "more robust than multinomial").
            noise_TE = torch.empty_like(masked_TE, memory_format=torch.legacy_contiguous_format).exponential_().log()
            pick_T1 = (masked_TE - noise_TE).max(dim=-1)[1].unsqueeze(-1)
        else:
            pick_T1 = argmax_T1
        probs_TE = torch.softmax(masked_TE, dim=-1)
        w_T1 = probs_TE.gather(dim=-1, index=pick_T1)
        if training:
            coin_T1 = torch.rand_like(w_T1)
            if j:
                coin_T1 = coin_T1.uniform_()  # the reference draws the second pick's coin twice
            is_max_T1 = pick_T1 == probs_TE.max(dim=-1, keepdim=True)[1]
            # Heun's third-order method: x1 when the sample is the argmax (or w.p. 1/4), else x1/3.
            factor_T1 = torch.add(0.3333, torch.logical_or(is_max_T1, coin_T1 > 0.75), alpha=0.6667).type_as(w_T1)
            # The value w * factor, the gradient of w alone (the reference's PhimoeMultiplier backward).
            w_T1 = (w_T1 * factor_T1).detach() + (w_T1 - w_T1.detach())
        idx.append(pick_T1)
        weights.append(w_T1)
    return torch.cat(idx, dim=-1), torch.cat(weights, dim=-1)
