"""Top-p dynamic router: "Harder Tasks Need More Experts: Dynamic Routing in MoE Models"
(Huang et al., arXiv 2403.07652).

Legend: T tokens, E experts, S sorted expert slots.

Stages (all fp32, vectorised over tokens):
  1. P_TE = softmax(logits)                                 (no temperature)
     score="sigmoid" or "sqrtsoftplus" (a sigmoid- or sqrt-softplus-scored model re-routed by top-p, e.g.
     DeepSeek-V3, DeepSeek-V4): the affinities s_TE = sigmoid(logits) (sqrt(softplus(logits))) normalised per
     token, P_TE = s_TE / sum_E s_TE; the mass and the order come from P, the combine weights from s (the
     raw affinities, as the model's own top-k combines)
  2. sort P descending (stable: ties go to the lower expert id) -> P_TS, idx_TS; c = cumsum
  3. slot s is selected iff the mass before it, c_{s-1} (c_{-1} = 0), is <= p: every expert with
     c <= p plus the one that crosses p (strict >), so a cumulative mass equal to p does not stop
     the selection (ZhenweiAn/Dynamic_MoE, `top_p_sampling_batched_all_sequence`). c_{s-1} is the
     inclusive cumsum shifted by one slot, exactly the reference's numbers; c_s - P_s rounds
     differently and drops an expert at p = c_{s-1} or p = 1. p >= 1 selects every expert.
     Then min_k <= count <= max_k.
  4. weights = raw P (sigmoid: s) of the selected experts, renormalised only if normalize=True, times
     routed_scaling_factor (1 unless converted from a top-k rule that scales)
Dynamic loss L_d = mean_t sum_i entr(P_ti): the router entropy, returned as aux["dynamic"]
(weight 1e-4 in the paper); without it the router flattens and selects ever more experts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from moekit import losses
from moekit.config import RouterConfig, require, setting
from moekit.routers.base import Router, RouterOutput
from moekit.routers.registry import register
from moekit.routers.topk import SCORES, scores_of


@dataclass
class TopPConfig(RouterConfig):
    """Top-p routing (arXiv 2403.07652): p (cumulative-probability threshold), min_k, max_k (optional cap),
    normalize (renormalise the chosen weights; None = no, the paper's raw probabilities); score
    "softmax" (the paper) or "sigmoid" (mass over the normalised sigmoid affinities, see the module doc);
    routed_scaling_factor on the weights. score, normalize and the scale carry over from a top-k rule
    converted with `moekit.route(model, kind="topp", p=...)`."""

    expert_count_fields: ClassVar[tuple[str, ...]] = ("min_k", "max_k")
    kind: str = setting("topp", "router: how tokens pick experts (moekit info lists them)")
    p: float = setting(0.4, "top-p: cumulative-probability threshold (arXiv 2403.07652)")
    min_k: int = setting(1, "fewest experts per token")
    max_k: int | None = setting(None, "most experts per token (None = no cap)")
    normalize: bool | None = setting(None, "renormalise the chosen experts' weights (None = no: the paper's "
                                           "raw probabilities)")
    score: str = setting("softmax", "score function: softmax (the paper), or sigmoid / sqrtsoftplus (mass over "
                                    "the normalised affinities)", choices=SCORES)
    routed_scaling_factor: float = setting(1.0, "multiply the combine weights by this factor")

    router_losses = ("dynamic",)

    def normalizes(self) -> bool:
        return bool(self.normalize)  # arXiv 2403.07652 combines with the raw probabilities

    def score_function(self) -> str:
        return self.score

    def describe(self) -> str:
        cap = f", max_k={self.max_k}" if self.max_k is not None else ""
        score = f", score={self.score}" if self.score != "softmax" else ""
        scale = f", scale={self.routed_scaling_factor}" if self.routed_scaling_factor != 1.0 else ""
        return f"p={self.p}, min_k={self.min_k}{cap}, normalize={self.normalizes()}{score}{scale}"

    def check(self, num_experts: int) -> None:
        check_topp_fields(self, num_experts)
        require(self.score in SCORES, "RouterConfig.score", self.score, f"one of {SCORES}")
        require(self.routed_scaling_factor > 0, "RouterConfig.routed_scaling_factor", self.routed_scaling_factor,
                "a float > 0")

    def expected_experts_per_token(self, num_experts: int) -> float:
        # per token: the worst case (its cap, else all experts); measure the real average
        return float(self.max_k or num_experts)

    def min_resident_experts(self, num_experts: int) -> int:
        # NOTE: an uncapped top-p token may use up to E experts; requiring E would forbid any budget
        # below 100%, so a token whose experts do not fit runs in several cache steps instead.
        return max(1, min(self.max_k or self.min_k, num_experts))

    def min_enabled_experts(self) -> int:
        return self.min_k

    def check_expert_mask(self, mask_E) -> None:
        """Forced experts join every token on top of the prefix."""


def check_topp_fields(cfg, num_experts: int) -> None:
    """The top-p fields' ranges (shared with routers that select by top-p)."""
    E = num_experts
    require(0 < cfg.p <= 1, "RouterConfig.p", cfg.p, "a float in (0, 1]")
    require(1 <= cfg.min_k <= E, "RouterConfig.min_k", cfg.min_k, f"an integer in [1, num_experts={E}]")
    require(cfg.max_k is None or cfg.min_k <= cfg.max_k <= E, "RouterConfig.max_k", cfg.max_k,
            f"None or an integer in [min_k={cfg.min_k}, num_experts={E}]")


@register("topp", config=TopPConfig)
class TopPRouter(Router):
    def select(self, logits_TE: torch.Tensor, x_TD: torch.Tensor,
               valid_T: torch.Tensor | None = None) -> RouterOutput:
        cfg = self.cfg
        return select_topp(logits_TE, cfg.p, cfg.min_k, cfg.max_k, cfg.normalizes(), self.expert_mask_E,
                           cfg.score, cfg.routed_scaling_factor)

    def balance_probs(self, route: RouterOutput) -> torch.Tensor:
        return losses.token_normalized(route.scores_TE) if self.cfg.score != "softmax" else route.scores_TE

    def aux_losses(self, route: RouterOutput, valid_T: torch.Tensor | None,
                   batch_counts: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        return {"dynamic": dynamic_loss(self.balance_probs(route), valid_T)}


def select_topp(logits_TE: torch.Tensor, p: float, min_k: int = 1, max_k: int | None = None,
                normalize: bool = False, mask_E: torch.Tensor | None = None, score: str = "softmax",
                routed_scaling_factor: float = 1.0) -> RouterOutput:
    """The top-p selection rule on fp32 logits (shared with routers that compute logits differently).
    mask_E: optional int8 expert mask; forced experts (+1) are always selected, on top of the prefix.
    score "sigmoid" / "sqrtsoftplus": the mass of the normalised affinities, the weights of the raw ones."""
    if score != "softmax":
        scores_TE = scores_of(logits_TE, score)
        probs_TE = losses.token_normalized(scores_TE)
    else:
        scores_TE = probs_TE = torch.softmax(logits_TE, dim=-1)
    P_TS, idx_TS = torch.sort(probs_TE, dim=-1, descending=True, stable=True)
    # arXiv 2403.07652 eq. 5-6: smallest prefix whose cumulative probability exceeds p.
    mass_before_TS = torch.nn.functional.pad(torch.cumsum(P_TS, dim=-1)[:, :-1], (1, 0))
    keep_TS = mass_before_TS <= p
    if p >= 1:
        keep_TS.fill_(True)  # fp32 sums may exceed 1 before the last expert
    slot_S = torch.arange(P_TS.shape[-1], device=P_TS.device)
    keep_TS |= slot_S < min_k
    if max_k is not None:
        keep_TS &= slot_S < max_k
    if mask_E is not None:
        keep_TS |= (mask_E > 0)[idx_TS]  # MoTE (arXiv 2502.11096): forced experts join every token
    token_idx_N, slot_N = keep_TS.nonzero(as_tuple=True)
    expert_idx_N = idx_TS[token_idx_N, slot_N]
    raw_TS = P_TS if score == "softmax" else scores_TE.gather(1, idx_TS)
    weight_N = raw_TS[token_idx_N, slot_N]
    if normalize:
        mass_T = (raw_TS * keep_TS).sum(-1)
        weight_N = weight_N / mass_T[token_idx_N]
    if routed_scaling_factor != 1.0:
        weight_N = weight_N * routed_scaling_factor
    return RouterOutput(token_idx_N, expert_idx_N, weight_N, scores_TE, logits_TE)


def dynamic_loss(scores_TE: torch.Tensor, valid_T: torch.Tensor | None) -> torch.Tensor:
    """arXiv 2403.07652 eq. 7: the mean router entropy over valid tokens."""
    # Safe entropy: entr(0) = 0, so saturated routers give no NaN.
    entropy_T = torch.special.entr(scores_TE).sum(-1)
    if valid_T is None:
        return entropy_T.mean() if entropy_T.numel() else entropy_T.new_zeros(())
    return (entropy_T * valid_T).sum() / valid_T.sum().clamp(min=1)
