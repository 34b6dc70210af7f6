"""Null experts: AdaMoE (Zeng et al., arXiv 2406.13233).

Legend: T tokens, D model dim, E real experts, M null experts, K picks per token.

M parameter-free null experts join the E real ones: softmax over E + M logits, top-k over all of
them (with a larger k than plain top-k; Mixtral recipe M=16, k=4). A pick of a null expert is
simply left out of the assignment, so it costs no FLOPs and adds nothing; a token whose picks are
all null gets zero MoE output. Combine weights are renormalised over the chosen *real* experts by
dividing by their sum, an exact zero sum (all picks null) replaced by 1, as the authors' code
(CengZihao/AdaMoE, `CustomMixtralSparseMoeBlock`) does: no clamp, so a real expert picked with a
tiny probability still gets its whole share. With k = 1 the default is the raw probability (see
`RouterConfig.normalizes`).

The gate keeps the real rows in `weight` (E, D) — a pretrained gate's own Parameter can be used
unchanged — and the null rows in `null_weight` (M, D), which start as copies (tiling) of the real
rows, as the paper does for a pretrained router. Until training parts them, a real expert and its null
twin tie exactly; torch.topk breaks exact ties (here as in the authors' code), and CPU and CUDA break them
differently, so an untrained null router can pick other experts on a GPU than on a CPU.

Balance loss (the paper's rule): each null expert's count is replaced by the mean null count
(only total null usage is constrained), then the Switch loss over E + M.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from moekit.config import RouterConfig, require, setting
from moekit.errors import UsageError
from moekit.losses import load_balance_loss
from moekit.routers.base import RouteExtras, Router, RouterOutput, warn_if_k1_normalized
from moekit.routers.registry import register


@dataclass
class NullConfig(RouterConfig):
    """Null experts (AdaMoE, arXiv 2406.13233): n_null parameter-free null experts, k (top-k over
    E + n_null), normalize (over the chosen real experts; default: for k > 1)."""

    expert_count_fields: ClassVar[tuple[str, ...]] = ("k", "n_null")
    kind: str = setting("null", "router: how tokens pick experts (moekit info lists them)")
    k: int = setting(2, "top-k over the real and the null experts (AdaMoE)")
    normalize: bool | None = setting(None, "renormalise over the chosen real experts (None = yes for k > 1)")
    n_null: int = setting(2, "parameter-free null experts (AdaMoE, arXiv 2406.13233)")

    def normalizes(self) -> bool:
        return self.normalize if self.normalize is not None else self.k > 1

    def describe(self) -> str:
        return f"k={self.k}, score=softmax, normalize={self.normalizes()}, n_null={self.n_null}"

    def check(self, num_experts: int) -> None:
        if self.n_null < 1:
            raise ValueError(f"RouterConfig.n_null={self.n_null} is invalid for kind='null'; allowed: an integer >= 1")
        require(1 <= self.k <= num_experts + self.n_null, "RouterConfig.k", self.k,
                f"an integer in [1, num_experts + n_null = {num_experts + self.n_null}]")
        warn_if_k1_normalized(self)

    def num_params(self, d_model: int, num_experts: int) -> int:
        return (num_experts + self.n_null) * d_model

    def expected_experts_per_token(self, num_experts: int) -> float:
        # real experts per token at balance: k * E / (E + n_null)  (AdaMoE)
        return self.k * num_experts / (num_experts + self.n_null)

    def min_enabled_experts(self) -> int:
        return self.k - self.n_null  # the real picks a token cannot send to null experts

    def check_expert_mask(self, mask_E) -> None:
        """Forced real experts take k slots first; null experts are never masked."""


@register("null", config=NullConfig)
class NullExpertRouter(Router):
    def __init__(self, cfg: NullConfig, d_model: int, num_experts: int):
        super().__init__(cfg, d_model, num_experts)
        self.null_weight = nn.Parameter(torch.empty(cfg.n_null, d_model))
        self.reset_null_rows()

    def check_reroute(self, cfg: NullConfig) -> None:
        rows = self.null_weight.shape[0]
        if cfg.n_null != rows:
            raise UsageError(f"RouterConfig(kind='null') n_null={cfg.n_null}: the router holds {rows} null rows "
                             f"(null_weight); expected n_null={rows}, the rows it holds")

    def adopt(self, old: Router) -> None:
        super().adopt(old)
        self.reset_null_rows()  # AdaMoE: null rows start as tiles of the *shared* (e.g. pretrained) gate rows

    @torch.no_grad()
    def reset_null_rows(self) -> None:
        """Null rows start as copies of the real rows, tiled (arXiv 2406.13233, §3)."""
        rows = torch.arange(self.cfg.n_null, device=self.weight.device) % self.num_experts
        self.null_weight.copy_(self.weight[rows])

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        w = torch.cat([self.weight, self.null_weight])
        # A pretrained logit bias covers the real experts; null experts have none.
        b = None if self.bias is None else torch.nn.functional.pad(self.bias, (0, self.cfg.n_null))
        return self.gate_linear(x_TD, w, b)

    def select(self, logits_TX: torch.Tensor, x_TD: torch.Tensor,
               valid_T: torch.Tensor | None = None) -> RouterOutput:
        E = self.num_experts
        probs_TX = torch.softmax(logits_TX, dim=-1)  # X = E + M
        choice_TX = probs_TX
        if self.expert_mask_E is not None:
            # forced real experts take one of the k slots (MoTE, arXiv 2502.11096); null columns are never masked
            forced_X = torch.nn.functional.pad(self.expert_mask_E > 0, (0, self.cfg.n_null))
            choice_TX = probs_TX.detach().masked_fill(forced_X, float("inf"))
        idx_TK = torch.topk(choice_TX, self.cfg.k, dim=-1, sorted=False).indices
        w_TK = probs_TX.gather(1, idx_TK)
        real_TK = idx_TK < E
        w_TK = w_TK * real_TK
        if self.cfg.normalizes():
            sum_T1 = w_TK.sum(-1, keepdim=True)
            w_TK = w_TK / torch.where(sum_T1 == 0, 1.0, sum_T1)  # all-null rows stay 0, not NaN
        route = RouterOutput.from_topk(idx_TK, w_TK, probs_TX[:, :E], logits_TX[:, :E])
        extras = RouteExtras(null_scores_TM=probs_TX[:, E:], null_picks_T=(~real_TK).sum(-1))
        return dataclasses.replace(route, extras=extras).keep(real_TK.reshape(-1))

    def aux_losses(self, route: RouterOutput, valid_T: torch.Tensor | None,
                   batch_counts: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        T = route.num_tokens
        n_valid = T if valid_T is None else int(valid_T.sum())
        real_counts_E = route.counts_E().float()
        if batch_counts is not None:  # f over the whole micro-batch (see Router.aux_losses)
            real_counts_E, n_valid = batch_counts[0].float(), int(batch_counts[1])
        M = self.cfg.n_null
        null_total = self.cfg.k * n_valid - real_counts_E.sum()
        counts_X = torch.cat([real_counts_E, (null_total / M).expand(M)])
        probs_TX = torch.cat([route.scores_TE, route.extras.null_scores_TM], dim=-1)
        return {"load_balance": load_balance_loss(probs_TX, counts_X, n_valid, valid_T)}
