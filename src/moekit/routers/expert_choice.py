"""Expert-choice router (Zhou et al., 2022, arXiv 2202.09368): each expert takes its top-C tokens.

Legend: T tokens, V valid (non-padding) tokens, E experts, C tokens per expert.

C = round(ec_capacity_factor * V / E), clipped to [1, V], over the *valid* tokens only: padding is
excluded before the experts pick, so it never takes an expert's slot. Among tokens of equal score an
expert takes the earlier one (a stable sort; flaxformer's `ExpertsChooseMaskedRouter` uses
`lax.top_k`, which does the same). A token may get 0..E experts and no balance loss is needed
(every expert gets exactly C tokens). NOTE: not causal — a token's routing depends on the other
tokens of the batch, later ones included, so causal language models refuse this router unless
`allow_causal_leak=True`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from moekit.config import RouterConfig, require, setting
from moekit.routers.base import Router, RouterOutput
from moekit.routers.registry import register


@dataclass
class ExpertChoiceConfig(RouterConfig):
    """Expert choice: each expert takes round(ec_capacity_factor * T / E) tokens; allow_causal_leak lets a
    causal language model train with it anyway (its routing then sees later tokens)."""

    expert_count_fields: ClassVar[tuple[str, ...]] = ("ec_capacity_factor",)
    kind: str = setting("expert_choice", "router: how tokens pick experts (moekit info lists them)")
    ec_capacity_factor: float = setting(2.0, "expert choice: each expert takes round(factor * T / E) tokens")
    allow_causal_leak: bool = setting(False, "let a causal LM train with expert choice (its routing then "
                                      "sees later tokens)")

    def describe(self) -> str:
        return f"ec_capacity_factor={self.ec_capacity_factor}"

    def check(self, num_experts: int) -> None:
        require(self.ec_capacity_factor > 0, "RouterConfig.ec_capacity_factor", self.ec_capacity_factor, "a float > 0")

    def expected_experts_per_token(self, num_experts: int) -> float:
        return float(min(num_experts, self.ec_capacity_factor))

    def is_causal(self) -> bool:
        return False

    def accepts_causal_leak(self) -> bool:
        return self.allow_causal_leak


@register("expert_choice", config=ExpertChoiceConfig)
class ExpertChoiceRouter(Router):

    def select(self, logits_TE: torch.Tensor, x_TD: torch.Tensor,
               valid_T: torch.Tensor | None = None) -> RouterOutput:
        T, E = logits_TE.shape
        scores_TE = torch.softmax(logits_TE, dim=-1)
        tok_V = (torch.arange(T, device=logits_TE.device) if valid_T is None
                 else valid_T.nonzero(as_tuple=True)[0])
        V = tok_V.numel()
        if V == 0:
            empty = torch.zeros(0, dtype=torch.int64, device=logits_TE.device)
            return RouterOutput(empty, empty, scores_TE.new_zeros(0), scores_TE, logits_TE)
        C = min(V, max(1, round(self.cfg.ec_capacity_factor * V / E)))
        # Stable descending sort: equal scores keep token order, so the earlier token wins a tie.
        order_EV = torch.sort(scores_TE[tok_V].t(), dim=-1, descending=True, stable=True).indices
        tok_EC = tok_V[order_EV[:, :C]]
        expert_idx_N = torch.arange(E, device=logits_TE.device).repeat_interleave(C)
        token_idx_N = tok_EC.reshape(-1)
        return RouterOutput(token_idx_N, expert_idx_N, scores_TE[token_idx_N, expert_idx_N], scores_TE, logits_TE)
