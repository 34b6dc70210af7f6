"""Mixture of LoRA experts on one linear layer (MoLA, arXiv 2402.08562; MixLoRA, arXiv 2404.15159),
chosen by any moekit router.

Legend: T tokens, I in_features, O out_features, r LoRA rank, E experts, N assignments.

Stages (the MoE layer's forward path, with LoRA experts):
  1. route     RouterOutput = router(x_TI): ragged (token_idx_N, expert_idx_N, weight_N), any rule
               (top-k, top-p, null experts, random, ...)
  2. plan      sort the N assignments by expert (moekit.dispatch.make_plan)
  3. permute   x_NI = x_TI[token_N]                    only the routed rows
  4. experts   h_Nr = x_NI A_e^T, y_NO = h_Nr B_e^T   two grouped GEMMs over (E, r, I) and (E, O, r)
  5. combine   delta_TO[t] = s * sum over t's assignments of weight_n * y_n      (s = lora_alpha / r)
Nothing of size T x E x I or T x E x O is built; a token with no assignment gets no update.
The plain per-expert formula is `moekit.adapters.reference.mixture_reference` (the test oracle).
"""

from __future__ import annotations

import torch
from torch import nn

from moekit.adapters.config import MixLoRAConfig
from moekit.adapters.layer import AdapterLayer, RoutedMixin, init_expert_A, register_layer
from moekit.dispatch import combine, make_plan, permute
from moekit.ops.grouped import grouped_linear


@register_layer
class MixLoRALinear(RoutedMixin, AdapterLayer):
    """`num_experts` LoRA experts (lora_A (E, r, I), lora_B (E, O, r)) and a moekit router over the
    layer input; aux losses as `RoutedMixin` (the Switch balance loss by default)."""

    config_class = MixLoRAConfig

    def __init__(self, base_layer: nn.Linear, cfg: MixLoRAConfig, index: int = 0):
        super().__init__(base_layer, cfg, index)
        E, r = cfg.num_experts, cfg.r
        self.lora_A = nn.Parameter(torch.empty(E, r, self.in_features, device=self.device))
        self.lora_B = nn.Parameter(torch.zeros(E, self.out_features, r, device=self.device))
        init_expert_A(self.lora_A)
        self.router = self._build_router(cfg, self.in_features, E, self.device)
        self.last_counts_E: torch.Tensor | None = None  # assignments per expert of the last forward

    def delta(self, x_TI: torch.Tensor) -> torch.Tensor:
        route = self._route(x_TI)
        plan = make_plan(route.token_idx_N, route.expert_idx_N, route.weight_N, self.cfg.num_experts)
        self.last_counts_E = plan.counts_E.detach()
        x_NI = self.lora_dropout(permute(x_TI, plan))
        h_Nr = grouped_linear(x_NI, self.lora_A, plan.offsets_E)
        y_NO = grouped_linear(h_Nr, self.lora_B, plan.offsets_E)
        return combine(y_NO, plan, x_TI.shape[0], x_TI.dtype) * self.scaling
