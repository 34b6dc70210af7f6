"""Expert-choice router (Zhou et al., 2022, arXiv 2202.09368): each expert takes its top-C tokens.

Legend: T tokens, E experts, C tokens per expert.

C = round(ec_capacity_factor * T / E), clipped to [1, T]. A token may get 0..E experts and no
balance loss is needed (every expert gets exactly C tokens). NOTE: not causal — a token's routing
depends on the other tokens of the batch, later ones included, so causal language models refuse
this router unless `allow_causal_leak=True`.
"""

from __future__ import annotations

import torch

from moekit.routers.base import Router, RouterOutput, register


@register("expert_choice")
class ExpertChoiceRouter(Router):
    is_causal = False

    def select(self, logits_TE: torch.Tensor, x_TD: torch.Tensor) -> RouterOutput:
        T, E = logits_TE.shape
        scores_TE = torch.softmax(logits_TE, dim=-1)
        C = min(T, max(1, round(self.cfg.ec_capacity_factor * T / E)))
        if T == 0:
            empty = torch.zeros(0, dtype=torch.int64, device=logits_TE.device)
            return RouterOutput(empty, empty, scores_TE.new_zeros(0), scores_TE, logits_TE)
        w_EC, tok_EC = torch.topk(scores_TE.t(), C, dim=-1)
        expert_idx_N = torch.arange(E, device=logits_TE.device).repeat_interleave(C)
        return RouterOutput(tok_EC.reshape(-1), expert_idx_N, w_EC.reshape(-1), scores_TE, logits_TE)
