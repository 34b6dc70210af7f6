"""Random fixed router with a growing k: SMoE-Dropout (Chen et al., arXiv 2303.01610).

Legend: T tokens, D model dim, E experts, K experts per token.

The gate is a randomly initialised linear map with bias, frozen (never trained). In training a
token takes the top-k(s) experts by logit, k(s) following a schedule over optimiser steps s that
grows from min_k to max_k (None = E); weights are a softmax over the selected k logits. The paper
trains with no balance loss and no z-loss (random routing is balanced in expectation and the
router is frozen): the `random` training preset sets both coefficients to 0. At inference any k works
("self-slimmable"): eval mode uses `k` (set it, or use `moekit.route(model, k=...)`).

Schedules over optimiser steps s and S = k_schedule_steps, the reference code's curves
(VITA-Group/Random-MoE-as-Dropout, `new_utils.calculate_gate_number`, the "*_increase" modes),
then clipped to [min_k, max_k]; round() is round-half-even, as in the reference:
  linear       k = round((max_k - min_k) * s / S) + min_k                      (the paper's default)
  cosine       k = round((min_k - max_k) * cos(pi * s' / (2S))) + max_k,  s' = min(s, S)
  exponential  k = round((min_k - max_k) * 0.99 ** (s // (S // 300))) + max_k
  multistep    k = [1, 2, 4, 8, 16][min(int(5 * s / S), 4)]                     (min_k, max_k only clip)
Conventions where the reference has none (its runs stop at s = S): cosine holds max_k after S
(the reference's cos would swing back); multistep keeps the last stage after S (the reference's
list index would overflow); exponential with S < 300 (the reference divides by S // 300 = 0) uses
the exponent floor(300 * s / S), so it still decays 300 times over S.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from moekit.config import RouterConfig, require, setting
from moekit.routers.base import Router, RouterOutput, StepCounts
from moekit.routers.registry import register

SCHEDULES = ("linear", "cosine", "exponential", "multistep")
MULTISTEP_KS = (1, 2, 4, 8, 16)  # the reference's custom_gate_number


def scheduled_k(schedule: str, step: int, total_steps: int, k_min: int, k_max: int) -> int:
    """k at optimiser step `step` (see the module doc; arXiv 2303.01610 and its reference code)."""
    s, S = step, total_steps
    if schedule == "linear":
        k = round((k_max - k_min) * s / S) + k_min
    elif schedule == "cosine":
        k = round((k_min - k_max) * math.cos(math.pi * min(s, S) / (2 * S))) + k_max
    elif schedule == "exponential":
        exponent = s // (S // 300) if S >= 300 else (300 * s) // S
        k = round((k_min - k_max) * 0.99 ** exponent) + k_max
    elif schedule == "multistep":
        k = MULTISTEP_KS[min(int(len(MULTISTEP_KS) * s / S), len(MULTISTEP_KS) - 1)]
    else:
        raise ValueError(f"RouterConfig.k_schedule={schedule!r} is invalid; allowed: one of {SCHEDULES}")
    return max(k_min, min(k_max, k))


@dataclass
class RandomConfig(RouterConfig):
    """SMoE-Dropout (arXiv 2303.01610): a frozen random router whose k grows in training from min_k to
    max_k (None = E) over k_schedule_steps optimiser steps along k_schedule; k is the inference k."""

    expert_count_fields: ClassVar[tuple[str, ...]] = ("k", "min_k", "max_k")
    kind: str = setting("random", "router: how tokens pick experts (moekit info lists them)")
    k: int = setting(2, "experts per token at inference (SMoE-Dropout, arXiv 2303.01610)")
    min_k: int = setting(1, "experts per token at the start of training")
    max_k: int | None = setting(None, "experts per token at the end of the schedule (None = E)")
    k_schedule: str = setting("linear", "how k grows from min_k to max_k in training", choices=SCHEDULES)
    k_schedule_steps: int = setting(1000, "optimiser steps over which k grows")

    def describe(self) -> str:
        return (f"k={self.k}, min_k={self.min_k}, max_k={self.max_k}, k_schedule={self.k_schedule}, "
                f"k_schedule_steps={self.k_schedule_steps}")

    def check(self, num_experts: int) -> None:
        E = num_experts
        require(1 <= self.k <= E, "RouterConfig.k", self.k, f"an integer in [1, num_experts={E}]")
        require(1 <= self.min_k <= E, "RouterConfig.min_k", self.min_k, f"an integer in [1, num_experts={E}]")
        require(self.max_k is None or self.min_k <= self.max_k <= E, "RouterConfig.max_k", self.max_k,
                f"None or an integer in [min_k={self.min_k}, num_experts={E}]")
        if self.k_schedule not in SCHEDULES:
            raise ValueError(f"RouterConfig.k_schedule={self.k_schedule!r} is invalid; allowed: one of {SCHEDULES}")
        if self.k_schedule_steps < 1:
            raise ValueError(f"RouterConfig.k_schedule_steps={self.k_schedule_steps} is invalid; allowed: an integer >= 1")

    def num_params(self, d_model: int, num_experts: int) -> int:
        return num_experts * d_model + num_experts  # frozen gate with bias

    def expected_experts_per_token(self, num_experts: int) -> float:
        return float(min(self.k, num_experts))  # the inference k

    def fixed_experts_per_token(self) -> bool:
        return True


@register("random", config=RandomConfig)
class RandomRouter(Router):
    expert_tensors = ("weight", "bias", "expert_scale")
    def __init__(self, cfg: RandomConfig, d_model: int, num_experts: int):
        super().__init__(cfg, d_model, num_experts)
        self.weight.requires_grad_(False)
        self.bias = nn.Parameter(torch.empty(num_experts).uniform_(-d_model**-0.5, d_model**-0.5),
                                 requires_grad=False)
        # Optimiser steps seen; persistent so that a resumed run continues the schedule.
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))

    def current_k(self) -> int:
        if not self.training:
            return self.cfg.k
        k_max = self.cfg.max_k or self.num_experts
        return scheduled_k(self.cfg.k_schedule, int(self.step), self.cfg.k_schedule_steps, self.cfg.min_k, k_max)

    def select(self, logits_TE: torch.Tensor, x_TD: torch.Tensor,
               valid_T: torch.Tensor | None = None) -> RouterOutput:
        top_TK = torch.topk(logits_TE, self.current_k(), dim=-1, sorted=False)
        w_TK = torch.softmax(top_TK.values, dim=-1)
        return RouterOutput.from_topk(top_TK.indices, w_TK, torch.softmax(logits_TE, dim=-1), logits_TE)

    def after_optimizer_step(self, counts: StepCounts) -> None:
        self.step += 1
