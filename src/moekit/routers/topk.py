"""Token-choice top-k router: the Mixtral / OLMoE / Qwen-MoE / DeepSeek-V2/V3 family.

Legend: T tokens, D model dim, E experts, K experts per token, G groups.

Stages:
  1. scores_TE = softmax(logits), sigmoid(logits) or sqrt(softplus(logits))  (fp32; the last is DeepSeek-V4's)
  2. selection scores = scores + bias_E (aux-loss-free balancing; selection only; `selection_bias_on="logits"`:
     logits + bias_E, Kolibri-1); expert masks: disabled -> -inf, forced -> +inf (on the biased scores, as
     DeepSeek-V3 needs)
  3. group-limited selection: keep `topk_group` of `n_group` groups, a group scored by its best expert
     (DeepSeek-V2) or its best two (DeepSeek-V3; `group_score`)
  4. top-k on the selection scores
  4'. (k = 2, `second_expert` "sampling" / "random": GShard top-2 gating as fairseq's top2gating runs it, see
     `select_top2_gshard`)
  5. combine weights from the *unbiased* scores, renormalised if `cfg.normalizes()` (default: for
     k > 1 only; k = 1 keeps the raw probability, as Switch Transformer) by their p-norm
     (`normalize_p`; 1 = their sum; DBRX) clamped below at `normalize_min` (ERNIE 4.5), times
     `routed_scaling_factor`.
The selection bias is an fp32 buffer that stays fp32 when the module is cast (see `Router`).
Balance losses count the plain top-k of the unbiased scores (no bias, no group limit), as
Megatron-LM's `compute_routing_scores_for_aux_loss` and DeepSeek-V3 eq. 18 do.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from moekit import losses
from moekit.config import RouterConfig, require, setting
from moekit.errors import UsageError
from moekit.routers.base import Router, RouterOutput, StepCounts, warn_if_k1_normalized
from moekit.routers.registry import register

SCORES = ("softmax", "sigmoid", "sqrtsoftplus")
GROUP_SCORES = ("max", "top2_sum")
BIAS_ON = ("scores", "logits")
SECOND_EXPERT = ("top", "sampling", "random")


@dataclass
class TopKConfig(RouterConfig):
    """Top-k routing (the Mixtral / OLMoE / Qwen / DeepSeek family).

    k experts per token; score "softmax"|"sigmoid"|"sqrtsoftplus" (DeepSeek-V4); normalize: renormalise
    the chosen weights (transformers' `norm_topk_prob`; None = the rule's default, see `normalizes()`),
    dividing by their p-norm (`normalize_p`, DBRX's `moe_normalize_expert_weights`; 1 = their sum)
    clamped below at `normalize_min` (ERNIE 4.5's `moe_norm_min`; 0 = no clamp);
    routed_scaling_factor; n_group/topk_group: group-limited selection (DeepSeek-V2/V3), a group scored
    by `group_score` ("max" of its experts, DeepSeek-V2; "top2_sum" of its best two, DeepSeek-V3 and
    Mistral 4; None = "max" for softmax scores, "top2_sum" otherwise);
    selection_bias_on: where the selection bias is added, to the "scores" (DeepSeek-V3) or the "logits"
    (Kolibri-1; the weights stay the unbiased scores either way);
    shared_slots S: the gate scores S more columns after the experts, one per always-on shared expert; every
    token takes all S, and their scores join the k chosen experts' in the renormalisation (then the
    scaling), so the shared experts are weighted per token (Inkling's `InklingTopkRouter`; the weights
    reach the layer as `RouteExtras.shared_weight_TS`); learned_scale: a learned scalar `global_scale`
    (1,) multiplies all the weights (Inkling);
    bias_update_rate: gamma of aux-loss-free balancing (0 disables the bias); bias_recenter: keep
    sum(bias) = 0.
    second_expert (k = 2, softmax, GShard top-2 gating as fairseq runs it for NLLB-MoE, arXiv 2006.16668): "top"
    the next best; "sampling" drawn from the softmax over the other experts (the argmax of their logits plus
    Gumbel noise); "random" the next best, kept with probability min(1, 2 p) for its softmax probability p.
    Both draw from torch's global generator, in eval too, as fairseq and transformers do.
    softmax_after_topk (softmax scores, renormalised, no groups): the experts are the top k of the logits (a
    selection bias, where one is held, added to the logits whatever `selection_bias_on` says) and their weights a
    softmax over those k logits, as gpt-oss's reference code (openai/gpt-oss, gpt_oss/torch/model.py, MLPBlock)
    and transformers' GptOssTopKRouter do: the renormalised top k of the softmax in exact arithmetic, but bit for
    bit that router's, and where probabilities underflow to a tie the larger logit wins.
    """

    expert_count_fields: ClassVar[tuple[str, ...]] = ("k",)
    kind: str = setting("topk", "router: how tokens pick experts (moekit info lists them)")
    k: int = setting(2, "experts per token")
    score: str = setting("softmax", "router score function", choices=SCORES)
    normalize: bool | None = setting(None, "renormalise the chosen experts' weights (None = yes for k > 1)")
    routed_scaling_factor: float = setting(1.0, "multiply the routed experts' weights by this (DeepSeek-V3)")
    n_group: int = setting(1, "expert groups for group-limited selection (DeepSeek-V2/V3; 1 = off)")
    topk_group: int = setting(1, "groups a token may pick its experts from")
    group_score: str | None = setting(None, "a group's score: its best expert (max) or best two (top2_sum); "
                                      "None = max for softmax scores, top2_sum otherwise",
                                      choices=(None, *GROUP_SCORES))
    normalize_p: float = setting(1.0, "renormalise by the chosen weights' p-norm (1 = their sum; DBRX)")
    normalize_min: float = setting(0.0, "clamp the renormalising denominator below at this (ERNIE 4.5; 0 = off)")
    selection_bias_on: str = setting("scores", "add the selection bias to the scores or to the logits "
                                     "(Kolibri-1)", choices=BIAS_ON)
    bias_update_rate: float = setting(0.0, "gamma of aux-loss-free balancing: selection-bias step per "
                                      "optimiser step (0 = off)")
    bias_recenter: bool = setting(False, "keep the selection bias summing to zero")
    second_expert: str = setting("top", "k=2: the second expert is the next best, sampled from the softmax over "
                                 "the rest, or the next best kept with probability 2p (GShard/NLLB)",
                                 choices=SECOND_EXPERT)
    shared_slots: int = setting(0, "router columns after the experts weighting as many always-on shared experts, "
                                   "normalised with the k chosen (Inkling; 0 = off)")
    learned_scale: bool = setting(False, "a learned scalar `global_scale` multiplies the weights (Inkling)")
    softmax_after_topk: bool = setting(False, "pick the top k of the logits and take a softmax over those k "
                                       "(gpt-oss) instead of renormalising the softmax's top k")

    def normalizes(self) -> bool:
        """Whether the chosen experts' weights are renormalised: `normalize` when set, else yes for k > 1,
        and no for k = 1, where a renormalised weight is always exactly 1 and the gate would learn nothing
        from the task loss (Switch Transformer, arXiv 2101.03961, uses the raw probability)."""
        return self.normalize if self.normalize is not None else self.k > 1

    def score_function(self) -> str:
        return self.score

    def weighted_shared_slots(self) -> int:
        return self.shared_slots

    def learned_weight_scale(self) -> bool:
        return self.learned_scale

    def num_params(self, d_model: int, num_experts: int) -> int:
        return num_experts * d_model + int(self.learned_scale)  # the gate, and the learned scale

    def group_rule(self) -> str:
        """How a group is scored: `group_score`, or the score function's default."""
        return self.group_score or ("max" if self.score == "softmax" else "top2_sum")

    def describe(self) -> str:
        parts = [f"k={self.k}", f"score={self.score}", f"normalize={self.normalizes()}"]
        if self.normalizes() and self.normalize_p != 1.0:
            parts.append(f"normalize_p={self.normalize_p:g}")
        if self.normalizes() and self.normalize_min > 0:
            parts.append(f"normalize_min={self.normalize_min:g}")
        if self.routed_scaling_factor != 1.0:
            parts.append(f"scale={self.routed_scaling_factor}")
        if self.n_group > 1:
            parts.append(f"groups={self.topk_group}/{self.n_group}")
            if self.group_rule() != ("max" if self.score == "softmax" else "top2_sum"):
                parts.append(f"group_score={self.group_rule()}")
        if self.logit_scale != 1.0:
            parts.append(f"logit_scale={self.logit_scale:g}")
        if self.selection_bias_on != "scores":
            parts.append(f"selection bias on {self.selection_bias_on}")
        if self.bias_update_rate > 0:
            parts.append(f"bias_update_rate={self.bias_update_rate}")
        if self.second_expert != "top":
            parts.append(f"second_expert={self.second_expert}")
        if self.shared_slots:
            parts.append(f"shared_slots={self.shared_slots}")
        if self.learned_scale:
            parts.append("learned_scale")
        if self.softmax_after_topk:
            parts.append("softmax after top-k")
        return ", ".join(parts)

    def check(self, num_experts: int) -> None:
        require(0 <= self.shared_slots < num_experts, "RouterConfig.shared_slots", self.shared_slots,
                f"an integer in [0, {num_experts})")
        E = num_experts - self.shared_slots  # the columns after the experts weight shared experts
        require(self.score in SCORES, "RouterConfig.score", self.score, f"one of {SCORES}")
        require(1 <= self.k <= E, "RouterConfig.k", self.k, f"an integer in [1, num_experts={E}]")
        require(self.routed_scaling_factor > 0, "RouterConfig.routed_scaling_factor", self.routed_scaling_factor,
                "a float > 0")
        require(self.n_group >= 1 and E % self.n_group == 0, "RouterConfig.n_group", self.n_group,
                f"a divisor of num_experts={E}")
        require(1 <= self.topk_group <= self.n_group, "RouterConfig.topk_group", self.topk_group,
                f"an integer in [1, n_group={self.n_group}]")
        require(self.bias_update_rate >= 0, "RouterConfig.bias_update_rate", self.bias_update_rate, "a float >= 0")
        require(self.group_score is None or self.group_score in GROUP_SCORES, "RouterConfig.group_score",
                self.group_score, f"None or one of {GROUP_SCORES}")
        require(self.normalize_p > 0, "RouterConfig.normalize_p", self.normalize_p, "a float > 0")
        require(self.normalize_min >= 0, "RouterConfig.normalize_min", self.normalize_min, "a float >= 0")
        require(self.selection_bias_on in BIAS_ON, "RouterConfig.selection_bias_on", self.selection_bias_on,
                f"one of {BIAS_ON}")
        require(self.second_expert == "top" or (self.k == 2 and self.score == "softmax" and self.n_group == 1
                                                and self.bias_update_rate == 0),
                "RouterConfig.second_expert", self.second_expert,
                f"one of {SECOND_EXPERT}; not 'top' only with k=2, softmax scores, no groups and no selection bias")
        # n_group: the groups would be scored on the logits, where DeepSeek scores them on the probabilities
        # (top2_sum differs); gpt-oss and Granite have none.
        require(not self.softmax_after_topk or (self.score == "softmax" and self.normalizes() and self.normalize_p == 1.0
                                                 and self.normalize_min == 0 and self.second_expert == "top"
                                                 and not self.shared_slots and self.n_group == 1),
                "RouterConfig.softmax_after_topk", self.softmax_after_topk,
                "False unless score='softmax' renormalised by the plain sum (normalize_p=1, normalize_min=0), "
                "second_expert='top', no shared_slots and no groups (n_group=1)")
        if self.n_group > 1:
            per_group = E // self.n_group
            # k = E picks every expert whatever the groups (transformers' DeepSeek-V3 test config: k=8 of 8, one of
            # two groups kept); in between, the top-k would take experts of dropped groups by the order of -inf ties.
            if self.topk_group * per_group < self.k < E:
                raise ValueError(
                    f"RouterConfig.k={self.k} is invalid with topk_group={self.topk_group} groups of {per_group} "
                    f"experts; allowed: k <= topk_group * num_experts / n_group = {self.topk_group * per_group}, "
                    f"or k = num_experts = {E} (every expert)")
            if self.group_rule() == "top2_sum" and per_group < 2:
                raise ValueError(f"RouterConfig.n_group={self.n_group} is invalid with group_score='top2_sum': group scores "
                                 f"sum the top-2 experts of a group, so each group needs >= 2 experts "
                                 f"(num_experts / n_group = {per_group})")
        warn_if_k1_normalized(self)

    def expected_experts_per_token(self, num_experts: int) -> float:
        return float(min(self.k, num_experts))

    def fixed_experts_per_token(self) -> bool:
        return self.second_expert != "random"

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
            if self.group_rule() == "top2_sum":
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
        default_groups = self.group_rule() == ("max" if self.score == "softmax" else "top2_sum")
        plain_norm = not self.normalizes() or (self.normalize_p == 1.0 and self.normalize_min == 0.0)
        if self.score not in ("softmax", "sigmoid") or not plain_norm or not default_groups \
                or self.selection_bias_on != "scores" or self.shared_slots or self.learned_scale:
            # a rule of a family export does not write (DeepSeek-V4, DBRX, ERNIE, Mistral 4, Kolibri-1, Inkling)
            return None
        return {"num_experts_per_tok": self.k, "scoring_func": self.score, "norm_topk_prob": self.normalizes(),
                "n_group": self.n_group, "topk_group": self.topk_group,
                "routed_scaling_factor": self.routed_scaling_factor, "selection_bias": self.bias_update_rate > 0,
                "softmax_after_topk": self.softmax_after_topk}


@register("topk", config=TopKConfig)
class TopKRouter(Router):
    fp32_buffers = ("e_score_correction_bias",)
    expert_tensors = ("weight", "e_score_correction_bias", "expert_scale")

    def __init__(self, cfg: TopKConfig, d_model: int, num_experts: int):
        super().__init__(cfg, d_model, num_experts)
        # Selection bias of auxiliary-loss-free balancing (arXiv 2408.15664); fp32, persistent so
        # that checkpoints keep it. Same name as transformers' DeepSeek-V3 buffer. The experts' only.
        self.register_buffer("e_score_correction_bias",
                             torch.zeros(num_experts - cfg.shared_slots, dtype=torch.float32))
        # Inkling's learned scalar on the weights (same name as its router's Parameter).
        self.global_scale = nn.Parameter(torch.ones(1)) if cfg.learned_scale else None

    def select(self, logits_TE: torch.Tensor, x_TD: torch.Tensor,
               valid_T: torch.Tensor | None = None) -> RouterOutput:
        cfg = self.cfg
        if cfg.second_expert != "top":
            return select_top2_gshard(logits_TE, cfg.second_expert, cfg.normalizes(), self.expert_mask_E)
        S = cfg.shared_slots
        if S == 0 and self.global_scale is None:
            # The bias is always added (adding a zero bias changes no score): asking whether it is zero would
            # be a device->host sync per layer and a data-dependent branch that torch.export cannot trace.
            return select_topk(logits_TE, cfg.k, cfg.score, cfg.normalizes(), cfg.routed_scaling_factor, cfg.n_group,
                               cfg.topk_group, self.e_score_correction_bias, self.expert_mask_E,
                               group_score=cfg.group_rule(), normalize_p=cfg.normalize_p,
                               normalize_min=cfg.normalize_min, bias_on=cfg.selection_bias_on,
                               softmax_after_topk=cfg.softmax_after_topk)
        # Router-weighted shared experts (Inkling): select among the E expert columns, then renormalise the k
        # chosen scores together with the S shared columns' scores, and scale both.
        E = logits_TE.shape[-1] - S
        mask_E = None if self.expert_mask_E is None else self.expert_mask_E[:E]  # a disabled shared column: weight 0
        route = select_topk(logits_TE[:, :E], cfg.k, cfg.score, False, 1.0, cfg.n_group, cfg.topk_group,
                            self.e_score_correction_bias, mask_E, group_score=cfg.group_rule(),
                            bias_on=cfg.selection_bias_on)
        T = logits_TE.shape[0]
        w_TK = route.weight_N.view(T, cfg.k)
        shared_TS = scores_of(logits_TE[:, E:], cfg.score)
        if cfg.normalizes():
            norm_T1 = renormalizer(torch.cat([w_TK, shared_TS], dim=-1), cfg.score, cfg.normalize_p, cfg.normalize_min)
            w_TK, shared_TS = w_TK / norm_T1, shared_TS / norm_T1
        scale = cfg.routed_scaling_factor if self.global_scale is None else \
            cfg.routed_scaling_factor * self.global_scale.float()
        w_TK, shared_TS = w_TK * scale, shared_TS * scale
        return dataclasses.replace(route, weight_N=w_TK.reshape(-1),
                                   extras=dataclasses.replace(route.extras, shared_weight_TS=shared_TS if S else None))

    def dense_choice(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
        """`forward`'s ops for the plain rule (no GShard second-expert policy, shared slots, learned scale or
        expert mask), without the RouterOutput (see `Router.dense_choice`)."""
        cfg = self.cfg
        if (cfg.second_expert != "top" or cfg.shared_slots or self.global_scale is not None
                or self.expert_mask_E is not None or type(self).forward is not Router.forward
                or type(self).select is not TopKRouter.select):
            return None
        logits_TE = self.scaled(self.logits(self.gate_input(self.jittered(x_TD))))
        idx_TK, w_TK, scores_TE = topk_choice(logits_TE, cfg.k, cfg.score, cfg.normalizes(), cfg.routed_scaling_factor,
                                              cfg.n_group, cfg.topk_group, self.e_score_correction_bias, None,
                                              group_score=cfg.group_rule(), normalize_p=cfg.normalize_p,
                                              normalize_min=cfg.normalize_min, bias_on=cfg.selection_bias_on,
                                              softmax_after_topk=cfg.softmax_after_topk)
        if self.expert_scale is not None:  # as `scale_weights`
            w_TK = w_TK * self.expert_scale.float()[idx_TK]
        return idx_TK, w_TK, scores_TE, logits_TE

    def dense_weights_descending(self) -> bool:
        # softmax_after_topk takes a softmax over the sorted top k (order kept), unless a selection bias ordered the
        # choice or per-expert scales reweigh it
        return (self.cfg.softmax_after_topk and self.e_score_correction_bias is None
                and self.expert_scale is None)

    def check_reroute(self, cfg: TopKConfig) -> None:
        """The learned scalar `global_scale` is made (or not) at construction: learned_scale cannot change under it."""
        held = self.global_scale is not None
        if cfg.learned_scale != held:
            raise UsageError(f"RouterConfig(kind='topk') learned_scale={cfg.learned_scale}: the router "
                             f"{'holds a' if held else 'has no'} learned scalar global_scale, which does not change; "
                             f"expected learned_scale={held}")

    def adopt(self, old: Router) -> None:
        super().adopt(old)
        bias = getattr(old, "e_score_correction_bias", None)
        if isinstance(bias, torch.Tensor):
            self.e_score_correction_bias = bias  # the same buffer: a pretrained selection bias keeps working
        elif "e_score_correction_bias" in old._buffers and not self.cfg.updates_selection_bias():
            self.e_score_correction_bias = None  # a pretrained router without one (see `drop_selection_bias`)

    def drop_selection_bias(self) -> None:
        """Hold no selection bias (the buffer becomes None): the plain top-k of the scores, without adding a zero
        bias, gathering the chosen scores and guarding their sum (4 ops per call, which a decoding step pays per
        layer). For a pretrained router that has none (transformers' Mixtral, Qwen, gpt-oss, ...); a bias
        assigned afterwards (`router.e_score_correction_bias = bias_E`) is used, and `update_bias` makes a zero
        one. Raises ValueError when the config updates the bias (bias_update_rate > 0)."""
        if self.cfg.updates_selection_bias():
            raise ValueError(f"TopKRouter.drop_selection_bias: bias_update_rate={self.cfg.bias_update_rate} updates "
                             "the selection bias; expected 0")
        self.e_score_correction_bias = None

    def _load_from_state_dict(self, state_dict, prefix, *args) -> None:
        # A saved selection bias (one `update_bias` trained after the bias was dropped) loads into a router that
        # holds none: a zero fp32 buffer takes it (shape checked as any buffer's), rather than an unexpected key.
        if self._buffers.get("e_score_correction_bias") is None and prefix + "e_score_correction_bias" in state_dict:
            self.e_score_correction_bias = torch.zeros(self.num_experts - self.cfg.shared_slots, dtype=torch.float32,
                                                       device=self.weight.device)
        super()._load_from_state_dict(state_dict, prefix, *args)

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
        # P averages probabilities: sigmoid (and sqrt-softplus) scores are normalised per token first (Megatron-LM).
        return losses.token_normalized(route.scores_TE) if self.cfg.score != "softmax" else route.scores_TE

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
        if self.e_score_correction_bias is None:  # dropped (see `drop_selection_bias`): start from zero
            self.e_score_correction_bias = torch.zeros(counts_E.shape, dtype=torch.float32, device=self.weight.device)
        counts_E = counts_E.float()
        delta_E = self.cfg.bias_update_rate * torch.sign(counts_E.mean() - counts_E)
        if self.cfg.bias_recenter:
            delta_E = delta_E - delta_E.mean()
        self.e_score_correction_bias.add_(delta_E.to(self.e_score_correction_bias.device))


def scores_of(logits_TE: torch.Tensor, score: str) -> torch.Tensor:
    """Router probabilities (T, E) fp32 from logits: softmax, sigmoid, or sqrt(softplus) (DeepSeek-V4)."""
    if score == "softmax":
        return torch.softmax(logits_TE, dim=-1)
    if score == "sigmoid":
        return torch.sigmoid(logits_TE)
    return torch.nn.functional.softplus(logits_TE).sqrt()


def select_topk(logits_TE: torch.Tensor, k: int, score: str = "softmax", normalize: bool = True,
                routed_scaling_factor: float = 1.0, n_group: int = 1, topk_group: int = 1,
                bias_E: torch.Tensor | None = None, mask_E: torch.Tensor | None = None, *,
                group_score: str | None = None, normalize_p: float = 1.0, normalize_min: float = 0.0,
                bias_on: str = "scores", softmax_after_topk: bool = False) -> RouterOutput:
    """The top-k selection rule on fp32 logits (shared with routers that compute logits differently).
    mask_E: optional int8 expert mask (-1 disabled, +1 forced), see `Router`; the keyword settings are
    TopKConfig's (group_score None: the score function's default)."""
    idx_TK, w_TK, scores_TE = topk_choice(logits_TE, k, score, normalize, routed_scaling_factor, n_group,
                                          topk_group, bias_E, mask_E, group_score=group_score,
                                          normalize_p=normalize_p, normalize_min=normalize_min, bias_on=bias_on,
                                          softmax_after_topk=softmax_after_topk)
    return RouterOutput.from_topk(idx_TK, w_TK, scores_TE, logits_TE)


def topk_choice(logits_TE: torch.Tensor, k: int, score: str = "softmax", normalize: bool = True,
                routed_scaling_factor: float = 1.0, n_group: int = 1, topk_group: int = 1,
                bias_E: torch.Tensor | None = None, mask_E: torch.Tensor | None = None, *,
                group_score: str | None = None, normalize_p: float = 1.0, normalize_min: float = 0.0,
                bias_on: str = "scores", softmax_after_topk: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`select_topk` as dense tensors: (idx_TK int64 (T, K), w_TK fp32 (T, K), scores_TE fp32 (T, E)), the
    chosen experts of each token, their combine weights and every expert's score (MoELayer's inference
    path reads these without building a RouterOutput)."""
    scores_TE = scores_of(logits_TE, score)
    # softmax_after_topk (gpt-oss): weights from the chosen logits; pick on them too, as its router does
    weights_from_TE = logits_TE if softmax_after_topk else scores_TE
    choice_TE = logits_TE if bias_on == "logits" or softmax_after_topk else scores_TE
    choice_TE = choice_TE + bias_E if bias_E is not None else choice_TE
    if choice_TE.requires_grad:  # (a detach without autograd would still cost a call)
        choice_TE = choice_TE.detach()
    if mask_E is not None:
        # MoTE (arXiv 2502.11096) on the selection scores, after the bias and before the group limit: a
        # forced expert takes one of the k slots (its weight stays its own score), a disabled one never does.
        choice_TE = choice_TE.masked_fill(mask_E < 0, float("-inf")).masked_fill(mask_E > 0, float("inf"))
    if n_group > 1:
        rule = group_score or ("max" if score == "softmax" else "top2_sum")
        choice_TE = _limit_groups(choice_TE, rule, n_group, topk_group)
    # Sorted where the k values are summed in the reference's order (descending): gpt-oss's softmax, and the
    # plain renormalised top k of Mixtral / Qwen / OLMoE (transformers' topk sorts; with k > 2 another order rounds
    # the sum otherwise). Routers with a selection bias (DeepSeek-V3's topk(sorted=False)) gather unsorted.
    if choice_TE is weights_from_TE:  # the plain top-k: its values are the chosen scores (or logits)
        w_TK, idx_TK = torch.topk(choice_TE, k, dim=-1, sorted=softmax_after_topk or (normalize and k > 2))
    else:
        idx_TK = torch.topk(choice_TE, k, dim=-1, sorted=softmax_after_topk).indices
        w_TK = weights_from_TE.gather(1, idx_TK)
    if softmax_after_topk:
        w_TK = torch.softmax(w_TK, dim=-1)
    elif normalize:
        # Without a selection bias or mask the chosen experts include each token's largest score (a group limit
        # keeps its group or a better one): no zero-sum guard.
        w_TK = w_TK / renormalizer(w_TK, score, normalize_p, normalize_min,
                                   plain=bias_E is None and mask_E is None)
    if routed_scaling_factor != 1.0:
        w_TK = w_TK * routed_scaling_factor
    return idx_TK, w_TK, scores_TE


def select_top2_gshard(logits_TE: torch.Tensor, policy: str, normalize: bool = True,
                       mask_E: torch.Tensor | None = None) -> RouterOutput:
    """GShard top-2 gating's second-expert policies as fairseq's `top2gating` runs them (arXiv 2006.16668; NLLB-MoE,
    arXiv 2207.04672), on fp32 logits (T, E): the first expert is the softmax's argmax; "sampling": the second is the
    argmax of the other experts' logits plus Gumbel(0, 1) noise, a draw from the softmax over them (the noise drawn
    on the CPU in one (T, E) call, as fairseq and transformers draw it); "random": the second is the next best,
    kept where 2 p > u, u ~ U(0, 1) one per token (p its softmax probability). Weights: the softmax probabilities
    of the picks, renormalised over both with `normalize` (a dropped second's share stays dropped; a capacity
    rule may renormalise again). mask_E: int8 expert mask (-1 disabled, +1 forced), as `select_topk`."""
    scores_TE = scores_of(logits_TE, "softmax")
    choice_TE = logits_TE.detach()
    if mask_E is not None:
        choice_TE = choice_TE.masked_fill(mask_E < 0, float("-inf")).masked_fill(mask_E > 0, float("inf"))
    first_T = choice_TE.argmax(-1)
    rest_TE = choice_TE
    if policy == "sampling":
        rest_TE = rest_TE + torch.distributions.gumbel.Gumbel(0.0, 1.0).rsample(rest_TE.shape).to(rest_TE.device)
    rest_TE = rest_TE.scatter(1, first_T[:, None], float("-inf"))
    idx_T2 = torch.stack([first_T, rest_TE.argmax(-1)], dim=-1)
    w_T2 = scores_TE.gather(1, idx_T2)
    p2_T = w_T2[:, 1]
    if normalize:
        w_T2 = w_T2 / w_T2.sum(dim=-1, keepdim=True)
    out = RouterOutput.from_topk(idx_T2, w_T2, scores_TE, logits_TE)
    if policy == "random":
        keep_T2 = torch.stack([torch.ones_like(first_T, dtype=torch.bool), 2 * p2_T > torch.rand_like(p2_T)], dim=-1)
        out = out.keep(keep_T2.reshape(-1))
    return out


def renormalizer(w_TK: torch.Tensor, score: str, p: float = 1.0, floor: float = 0.0,
                 plain: bool = False) -> torch.Tensor:
    """What the chosen weights w_TK (T, K) of score function `score` are divided by when renormalised:
    their p-norm (p = 1: their sum; the weights are >= 0), clamped below at `floor` where one is set (T, 1).
    plain=True: the weights are the plain top-k of the scores (no selection bias, no expert mask; a group
    limit allowed), so softmax weights include each token's largest probability (>= 1/E) or a group's at least
    as large, and their sum is never 0 (the zero-sum guard below is skipped). A selection bias or a mask can
    choose experts whose probabilities underflow to 0: keep the guard there (False)."""
    norm_T1 = w_TK.sum(dim=-1, keepdim=True) if p == 1.0 else torch.linalg.vector_norm(w_TK, ord=p, dim=-1,
                                                                                      keepdim=True)
    if floor > 0:
        # ERNIE 4.5: w / clamp(sum, min=moe_norm_min).
        return norm_T1.clamp(min=floor)
    if score != "softmax":
        # + 1e-20 as transformers' DeepSeek-V3 / GLM-4-MoE / DeepSeek-V4 routers (which moekit.hf wraps);
        # DeepSeek-V3's own inference code divides plainly: the two differ only for sums below ~1e-13.
        return norm_T1 + 1e-20
    # Mixtral / OLMoE / Qwen divide by the plain sum (>= 1/E for softmax scores; only experts of underflowed
    # probability, forced or chosen by a selection bias, sum to 0, and that row stays 0, not NaN). DBRX
    # divides by torch.norm(p).
    return norm_T1 if plain else norm_T1.masked_fill(norm_T1 == 0, 1.0)


def _limit_groups(choice_TE: torch.Tensor, group_score: str, n_group: int, topk_group: int) -> torch.Tensor:
    """Group-limited routing: other groups' scores become -inf (DeepSeek-V2/V3)."""
    T, E = choice_TE.shape
    G = n_group
    grouped_TGe = choice_TE.view(T, G, E // G)
    if group_score == "top2_sum":
        # DeepSeek-V3 (arXiv 2412.19437): group score = sum of the top-2 biased scores (Mistral 4: of softmax).
        group_TG = grouped_TGe.topk(2, dim=-1).values.sum(dim=-1)
    else:
        # DeepSeek-V2 (arXiv 2405.04434): group score = max within the group.
        group_TG = grouped_TGe.max(dim=-1).values
    keep_TG = torch.zeros_like(group_TG, dtype=torch.bool)
    keep_TG.scatter_(1, torch.topk(group_TG, topk_group, dim=-1, sorted=False).indices, True)
    return grouped_TGe.masked_fill(~keep_TG.unsqueeze(-1), float("-inf")).view(T, E)
