"""Token-choice top-k router: the Mixtral / OLMoE / Qwen-MoE / DeepSeek-V2/V3 family.

Legend: T tokens, D model dim, E experts, K experts per token, G groups.

Stages:
  1. scores_TE = softmax(logits) or sigmoid(logits)                 (fp32)
  2. selection scores = scores + bias_E (aux-loss-free balancing; selection only); expert masks:
     disabled -> -inf, forced -> +inf (on the biased scores, as DeepSeek-V3 needs)
  3. group-limited selection: keep `topk_group` of `n_group` groups   (DeepSeek-V3)
  4. top-k on the selection scores
  5. combine weights from the *unbiased* scores, renormalised if `cfg.normalizes()` (default: for
     k > 1 only; k = 1 keeps the raw probability, as Switch Transformer), times `routed_scaling_factor`.
The selection bias is an fp32 buffer that stays fp32 when the module is cast (see `Router`).
Balance losses count the plain top-k of the unbiased scores (no bias, no group limit), as
Megatron-LM's `compute_routing_scores_for_aux_loss` and DeepSeek-V3 eq. 18 do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from moekit import losses
from moekit.config import RouterConfig, require, setting
from moekit.routers.base import Router, RouterOutput, StepCounts, warn_if_k1_normalized
from moekit.routers.registry import register

SCORES = ("softmax", "sigmoid")


@dataclass
class TopKConfig(RouterConfig):
    """Top-k routing (the Mixtral / OLMoE / Qwen / DeepSeek family).

    k experts per token; score "softmax"|"sigmoid"; normalize: renormalise the chosen weights
    (transformers' `norm_topk_prob`; None = the rule's default, see `normalizes()`);
    routed_scaling_factor; n_group/topk_group: group-limited selection (DeepSeek-V2/V3);
    bias_update_rate: gamma of aux-loss-free balancing (0 disables the bias); bias_recenter: keep
    sum(bias) = 0.
    """

    kind: str = setting("topk", "router: how tokens pick experts (moekit info lists them)")
    k: int = setting(2, "experts per token")
    score: str = setting("softmax", "router score function", choices=SCORES)
    normalize: bool | None = setting(None, "renormalise the chosen experts' weights (None = yes for k > 1)")
    routed_scaling_factor: float = setting(1.0, "multiply the routed experts' weights by this (DeepSeek-V3)")
    n_group: int = setting(1, "expert groups for group-limited selection (DeepSeek-V2/V3; 1 = off)")
    topk_group: int = setting(1, "groups a token may pick its experts from")
    bias_update_rate: float = setting(0.0, "gamma of aux-loss-free balancing: selection-bias step per "
                                      "optimiser step (0 = off)")
    bias_recenter: bool = setting(False, "keep the selection bias summing to zero")

    def normalizes(self) -> bool:
        """Whether the chosen experts' weights are renormalised: `normalize` when set, else yes for k > 1,
        and no for k = 1, where a renormalised weight is always exactly 1 and the gate would learn nothing
        from the task loss (Switch Transformer, arXiv 2101.03961, uses the raw probability)."""
        return self.normalize if self.normalize is not None else self.k > 1

    def score_function(self) -> str:
        return self.score

    def describe(self) -> str:
        parts = [f"k={self.k}", f"score={self.score}", f"normalize={self.normalizes()}"]
        if self.routed_scaling_factor != 1.0:
            parts.append(f"scale={self.routed_scaling_factor}")
        if self.n_group > 1:
            parts.append(f"groups={self.topk_group}/{self.n_group}")
        if self.bias_update_rate > 0:
            parts.append(f"bias_update_rate={self.bias_update_rate}")
        return ", ".join(parts)

    def check(self, num_experts: int) -> None:
        E = num_experts
        require(self.score in SCORES, "RouterConfig.score", self.score, f"one of {SCORES}")
        require(1 <= self.k <= E, "RouterConfig.k", self.k, f"an integer in [1, num_experts={E}]")
        require(self.routed_scaling_factor > 0, "RouterConfig.routed_scaling_factor", self.routed_scaling_factor,
                "a float > 0")
        require(self.n_group >= 1 and E % self.n_group == 0, "RouterConfig.n_group", self.n_group,
                f"a divisor of num_experts={E}")
        require(1 <= self.topk_group <= self.n_group, "RouterConfig.topk_group", self.topk_group,
                f"an integer in [1, n_group={self.n_group}]")
        require(self.bias_update_rate >= 0, "RouterConfig.bias_update_rate", self.bias_update_rate, "a float >= 0")
        if self.n_group > 1:
            per_group = E // self.n_group
            # k = E picks every expert whatever the groups (transformers' DeepSeek-V3 test config: k=8 of 8, one of
            # two groups kept); in between, the top-k would take experts of dropped groups by the order of -inf ties.
            if self.topk_group * per_group < self.k < E:
                raise ValueError(
                    f"RouterConfig.k={self.k} is invalid with topk_group={self.topk_group} groups of {per_group} "
                    f"experts; allowed: k <= topk_group * num_experts / n_group = {self.topk_group * per_group}, "
                    f"or k = num_experts = {E} (every expert)")
            if self.score == "sigmoid" and per_group < 2:
                raise ValueError(f"RouterConfig.n_group={self.n_group} is invalid with sigmoid scores: group scores "
                                 f"sum the top-2 experts of a group, so each group needs >= 2 experts "
                                 f"(num_experts / n_group = {per_group})")
        warn_if_k1_normalized(self)

    def expected_experts_per_token(self, num_experts: int) -> float:
        return float(min(self.k, num_experts))

    def fixed_experts_per_token(self) -> bool:
        return True

    def min_enabled_experts(self) -> int:
        return self.k

    def check_expert_mask(self, mask_E) -> None:
        """Forced experts take k slots first (on the biased scores, before the group limit)."""
        n_on = int((mask_E > 0).sum())
        if n_on > self.k:
            raise ValueError(f"{n_on} forced experts do not fit in k={self.k} slots")
        if self.n_group > 1 and n_on:
            mask_GE = mask_E.view(self.n_group, -1)
            forced_groups = int((mask_GE > 0).any(-1).sum())
            if forced_groups > self.topk_group:
                raise ValueError(f"forced experts lie in {forced_groups} groups, but group-limited routing keeps "
                                 f"only topk_group={self.topk_group} of {self.n_group}")
            if self.score == "sigmoid":
                # DeepSeek-V3 scores a group by its top-2 experts: +inf (forced) plus -inf (disabled) is NaN.
                lonely = ((mask_GE > 0).any(-1) & ((mask_GE >= 0).sum(-1) < 2)).nonzero().flatten()
                if lonely.numel():
                    raise ValueError(f"groups {lonely.tolist()} hold a forced expert and no other enabled expert; "
                                     "a group's score sums its top-2 experts, so keep one more expert of that "
                                     "group enabled")

    def expert_groups(self) -> int:
        return self.n_group

    def updates_selection_bias(self) -> bool:
        return self.bias_update_rate > 0

    def hf_routing(self) -> dict[str, Any] | None:
        return {"num_experts_per_tok": self.k, "scoring_func": self.score, "norm_topk_prob": self.normalizes(),
                "n_group": self.n_group, "topk_group": self.topk_group,
                "routed_scaling_factor": self.routed_scaling_factor, "selection_bias": self.bias_update_rate > 0}


@register("topk", config=TopKConfig)
class TopKRouter(Router):
    fp32_buffers = ("e_score_correction_bias",)
    expert_tensors = ("weight", "e_score_correction_bias")

    def __init__(self, cfg: TopKConfig, d_model: int, num_experts: int):
        super().__init__(cfg, d_model, num_experts)
        # Selection bias of auxiliary-loss-free balancing (arXiv 2408.15664); fp32, persistent so
        # that checkpoints keep it. Same name as transformers' DeepSeek-V3 buffer.
        self.register_buffer("e_score_correction_bias", torch.zeros(num_experts, dtype=torch.float32))

    def select(self, logits_TE: torch.Tensor, x_TD: torch.Tensor,
               valid_T: torch.Tensor | None = None) -> RouterOutput:
        cfg = self.cfg
        # The bias is always added (adding a zero bias changes no score): asking whether it is zero would
        # be a device->host sync per layer and a data-dependent branch that torch.export cannot trace.
        return select_topk(logits_TE, cfg.k, cfg.score, cfg.normalizes(), cfg.routed_scaling_factor, cfg.n_group,
                           cfg.topk_group, self.e_score_correction_bias, self.expert_mask_E)

    def adopt(self, old: Router) -> None:
        super().adopt(old)
        bias = getattr(old, "e_score_correction_bias", None)
        if isinstance(bias, torch.Tensor):
            self.e_score_correction_bias = bias  # the same buffer: a pretrained selection bias keeps working

    def balance_assignment(self, route: RouterOutput,
                           valid_T: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The plain top-k of the unbiased scores over valid tokens, before capacity dropping: with a
        selection bias, a group limit or an expert mask this differs from the routed experts. Recomputed
        always (one top-k over (T, E), only when autograd is on): whether the bias is zero is not known
        without a device->host sync."""
        T = route.num_tokens
        idx_TK = torch.topk(route.scores_TE.detach(), self.cfg.k, dim=-1, sorted=False).indices
        token_idx_N = torch.arange(T, device=idx_TK.device).repeat_interleave(self.cfg.k)
        expert_idx_N = idx_TK.reshape(-1)
        if valid_T is not None:
            keep_N = valid_T[token_idx_N]
            token_idx_N, expert_idx_N = token_idx_N[keep_N], expert_idx_N[keep_N]
        return token_idx_N, expert_idx_N

    def balance_probs(self, route: RouterOutput) -> torch.Tensor:
        # P averages probabilities: sigmoid scores are normalised per token first (Megatron-LM).
        return losses.token_normalized(route.scores_TE) if self.cfg.score == "sigmoid" else route.scores_TE

    def after_optimizer_step(self, counts: StepCounts) -> None:
        # Megatron-LM updates its expert bias from the routing map after token dropping: executed counts.
        self.update_bias(counts.executed_E)

    @torch.no_grad()
    def update_bias(self, counts_E: torch.Tensor) -> None:
        """Aux-loss-free balancing (arXiv 2408.15664): b_i += gamma * sign(mean_j c_j - c_i).

        Called once per optimiser step with that step's (global) counts.
        """
        if self.cfg.bias_update_rate <= 0:
            return
        counts_E = counts_E.float()
        delta_E = self.cfg.bias_update_rate * torch.sign(counts_E.mean() - counts_E)
        if self.cfg.bias_recenter:
            delta_E = delta_E - delta_E.mean()
        self.e_score_correction_bias.add_(delta_E.to(self.e_score_correction_bias.device))


def select_topk(logits_TE: torch.Tensor, k: int, score: str = "softmax", normalize: bool = True,
                routed_scaling_factor: float = 1.0, n_group: int = 1, topk_group: int = 1,
                bias_E: torch.Tensor | None = None, mask_E: torch.Tensor | None = None) -> RouterOutput:
    """The top-k selection rule on fp32 logits (shared with routers that compute logits differently).
    mask_E: optional int8 expert mask (-1 disabled, +1 forced), see `Router`."""
    if score == "softmax":
        scores_TE = torch.softmax(logits_TE, dim=-1)
    else:
        scores_TE = torch.sigmoid(logits_TE)
    choice_TE = scores_TE + bias_E if bias_E is not None else scores_TE
    choice_TE = choice_TE.detach()
    if mask_E is not None:
        # MoTE (arXiv 2502.11096) on the selection scores, after the bias and before the group limit: a
        # forced expert takes one of the k slots (its weight stays its own score), a disabled one never does.
        choice_TE = choice_TE.masked_fill(mask_E < 0, float("-inf")).masked_fill(mask_E > 0, float("inf"))
    if n_group > 1:
        choice_TE = _limit_groups(choice_TE, score, n_group, topk_group)
    idx_TK = torch.topk(choice_TE, k, dim=-1, sorted=False).indices
    w_TK = scores_TE.gather(1, idx_TK)
    if normalize:
        if score == "sigmoid":
            # + 1e-20 as transformers' DeepSeek-V3 / GLM-4-MoE routers (which moekit.hf wraps); DeepSeek-V3's
            # own inference code divides plainly: the two differ only for sums below ~1e-13.
            w_TK = w_TK / (w_TK.sum(dim=-1, keepdim=True) + 1e-20)
        else:
            # Mixtral / OLMoE / Qwen divide by the plain sum (>= 1/E for softmax scores; only k forced
            # experts of underflowed probability sum to 0, and that row stays 0, not NaN).
            sum_T1 = w_TK.sum(dim=-1, keepdim=True)
            w_TK = w_TK / torch.where(sum_T1 == 0, 1.0, sum_T1)
    if routed_scaling_factor != 1.0:
        w_TK = w_TK * routed_scaling_factor
    return RouterOutput.from_topk(idx_TK, w_TK, scores_TE, logits_TE)


def _limit_groups(choice_TE: torch.Tensor, score: str, n_group: int, topk_group: int) -> torch.Tensor:
    """Group-limited routing: other groups' scores become -inf (DeepSeek-V2/V3)."""
    T, E = choice_TE.shape
    G = n_group
    grouped_TGe = choice_TE.view(T, G, E // G)
    if score == "sigmoid":
        # DeepSeek-V3 (arXiv 2412.19437): group score = sum of the top-2 biased scores.
        group_TG = grouped_TGe.topk(2, dim=-1).values.sum(dim=-1)
    else:
        # DeepSeek-V2 (arXiv 2405.04434): group score = max within the group.
        group_TG = grouped_TGe.max(dim=-1).values
    keep_TG = torch.zeros_like(group_TG, dtype=torch.bool)
    keep_TG.scatter_(1, torch.topk(group_TG, topk_group, dim=-1, sorted=False).indices, True)
    return grouped_TGe.masked_fill(~keep_TG.unsqueeze(-1), float("-inf")).view(T, E)
