"""Random fixed router with a growing k: SMoE-Dropout (Chen et al., arXiv 2303.01610).

Legend: T tokens, D model dim, E experts, K experts per token.

The gate is a randomly initialised linear map with bias, frozen (never trained). In training a
token takes the top-k(s) experts by logit, k(s) following a schedule over optimiser steps s that
grows from min_k to max_k (None = E); weights are a softmax over the selected k logits. No
balance loss is needed (random routing is balanced in expectation). At inference any k works
("self-slimmable"): eval mode uses `k` (set it, or use `moekit.route(model, k=...)`).

Schedules over S = k_schedule_steps, clipped to [min_k, max_k]:
  linear       k = round((max_k - min_k) * s / S) + min_k           (the paper's default)
  cosine       k = min_k + round((max_k - min_k) * (1 - cos(pi * min(s/S, 1))) / 2)
  exponential  k = round(min_k * (max_k / min_k) ** min(s/S, 1))
  multistep    k = min_k + floor((max_k - min_k + 1) * s / S)        (equal-length stages)
"""

from __future__ import annotations

import math

import torch
from torch import nn

from moekit.config import RouterConfig
from moekit.routers.base import Router, RouterOutput, register

SCHEDULES = ("linear", "cosine", "exponential", "multistep")


def scheduled_k(schedule: str, step: int, total_steps: int, k_min: int, k_max: int) -> int:
    frac = min(step / total_steps, 1.0)
    span = k_max - k_min
    if schedule == "linear":
        k = round(span * frac) + k_min
    elif schedule == "cosine":
        k = k_min + round(span * (1 - math.cos(math.pi * frac)) / 2)
    elif schedule == "exponential":
        k = round(k_min * (k_max / k_min) ** frac)
    elif schedule == "multistep":
        k = k_min + math.floor((span + 1) * frac)
    else:
        raise ValueError(f"RouterConfig.k_schedule={schedule!r} is invalid; allowed: one of {SCHEDULES}")
    return max(k_min, min(k_max, k))


@register("random")
class RandomRouter(Router):
    def __init__(self, cfg: RouterConfig, d_model: int, num_experts: int):
        super().__init__(cfg, d_model, num_experts)
        self.weight.requires_grad_(False)
        self.bias = nn.Parameter(torch.empty(num_experts).uniform_(-d_model**-0.5, d_model**-0.5),
                                 requires_grad=False)
        # Optimiser steps seen; persistent so that a resumed run continues the schedule.
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))

    @classmethod
    def check_config(cls, cfg: RouterConfig, num_experts: int) -> None:
        if cfg.k_schedule not in SCHEDULES:
            raise ValueError(f"RouterConfig.k_schedule={cfg.k_schedule!r} is invalid; allowed: one of {SCHEDULES}")
        if cfg.k_schedule_steps < 1:
            raise ValueError(f"RouterConfig.k_schedule_steps={cfg.k_schedule_steps} is invalid; allowed: an integer >= 1")
        if cfg.k > num_experts:
            raise ValueError(f"RouterConfig.k={cfg.k} is invalid; allowed: an integer in [1, num_experts={num_experts}]")

    def current_k(self) -> int:
        if not self.training:
            return self.cfg.k
        k_max = self.cfg.max_k or self.num_experts
        return scheduled_k(self.cfg.k_schedule, int(self.step), self.cfg.k_schedule_steps, self.cfg.min_k, k_max)

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x_TD.float(), self.weight.float(), self.bias.float())

    def select(self, logits_TE: torch.Tensor, x_TD: torch.Tensor) -> RouterOutput:
        top_TK = torch.topk(logits_TE, self.current_k(), dim=-1, sorted=False)
        w_TK = torch.softmax(top_TK.values, dim=-1)
        return RouterOutput.from_topk(top_TK.indices, w_TK, torch.softmax(logits_TE, dim=-1), logits_TE)

    def after_optimizer_step(self, counts_E: torch.Tensor) -> None:
        self.step += 1
