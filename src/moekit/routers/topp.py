"""Top-p dynamic router: "Harder Tasks Need More Experts: Dynamic Routing in MoE Models"
(Huang et al., arXiv 2403.07652).

Legend: T tokens, E experts, S sorted expert slots.

Stages (all fp32, vectorised over tokens):
  1. P_TE = softmax(logits)                                 (no temperature)
  2. sort P descending (stable: ties go to the lower expert id) -> P_TS, idx_TS; c = cumsum
  3. slot s is selected iff the mass before it, c_{s-1} (c_{-1} = 0), is <= p: every expert with
     c <= p plus the one that crosses p (strict >), so a cumulative mass equal to p does not stop
     the selection (ZhenweiAn/Dynamic_MoE, `top_p_sampling_batched_all_sequence`). c_{s-1} is the
     inclusive cumsum shifted by one slot, exactly the reference's numbers; c_s - P_s rounds
     differently and drops an expert at p = c_{s-1} or p = 1. p >= 1 selects every expert.
     Then min_k <= count <= max_k.
  4. weights = raw P of the selected experts (renormalised only if normalize=True)
Dynamic loss L_d = mean_t sum_i entr(P_ti): the router entropy, returned as aux["dynamic"]
(weight 1e-4 in the paper); without it the router flattens and selects ever more experts.
"""

from __future__ import annotations

import torch

from moekit.config import RouterConfig
from moekit.routers.base import Router, RouterOutput, register


@register("topp")
class TopPRouter(Router):
    @classmethod
    def check_config(cls, cfg: RouterConfig, num_experts: int) -> None:
        if cfg.score != "softmax":
            raise ValueError(f"RouterConfig.score={cfg.score!r} is invalid for kind='topp'; allowed: 'softmax' "
                             "(top-p needs a probability distribution over experts)")

    supports_forced_experts = True

    def select(self, logits_TE: torch.Tensor, x_TD: torch.Tensor,
               valid_T: torch.Tensor | None = None) -> RouterOutput:
        return select_topp(logits_TE, self.cfg, self.expert_mask_E)

    def aux_losses(self, route: RouterOutput, valid_T: torch.Tensor | None) -> dict[str, torch.Tensor]:
        return {"dynamic": dynamic_loss(route.scores_TE, valid_T)}

    @classmethod
    def aux_loss_names(cls, cfg: RouterConfig) -> tuple[str, ...]:
        return ("dynamic",)


def select_topp(logits_TE: torch.Tensor, cfg: RouterConfig, mask_E: torch.Tensor | None = None) -> RouterOutput:
    """The top-p selection rule on fp32 logits (shared with routers that compute logits differently).
    mask_E: optional int8 expert mask; forced experts (+1) are always selected, on top of the prefix."""
    scores_TE = torch.softmax(logits_TE, dim=-1)
    P_TS, idx_TS = torch.sort(scores_TE, dim=-1, descending=True, stable=True)
    # arXiv 2403.07652 eq. 5-6: smallest prefix whose cumulative probability exceeds p.
    mass_before_TS = torch.nn.functional.pad(torch.cumsum(P_TS, dim=-1)[:, :-1], (1, 0))
    keep_TS = mass_before_TS <= cfg.p
    if cfg.p >= 1:
        keep_TS.fill_(True)  # fp32 sums may exceed 1 before the last expert
    slot_S = torch.arange(P_TS.shape[-1], device=P_TS.device)
    keep_TS |= slot_S < cfg.min_k
    if cfg.max_k is not None:
        keep_TS &= slot_S < cfg.max_k
    if mask_E is not None:
        keep_TS |= (mask_E > 0)[idx_TS]  # MoTE (arXiv 2502.11096): forced experts join every token
    token_idx_N, slot_N = keep_TS.nonzero(as_tuple=True)
    expert_idx_N = idx_TS[token_idx_N, slot_N]
    weight_N = P_TS[token_idx_N, slot_N]
    if cfg.normalizes():
        mass_T = (P_TS * keep_TS).sum(-1)
        weight_N = weight_N / mass_T[token_idx_N]
    return RouterOutput(token_idx_N, expert_idx_N, weight_N, scores_TE, logits_TE)


def dynamic_loss(scores_TE: torch.Tensor, valid_T: torch.Tensor | None) -> torch.Tensor:
    """arXiv 2403.07652 eq. 7: the mean router entropy over valid tokens."""
    # Safe entropy: entr(0) = 0, so saturated routers give no NaN.
    entropy_T = torch.special.entr(scores_TE).sum(-1)
    if valid_T is None:
        return entropy_T.mean() if entropy_T.numel() else entropy_T.new_zeros(())
    return (entropy_T * valid_T).sum() / valid_T.sum().clamp(min=1)
