"""SMoRA (arXiv 2501.15103): each rank of one LoRA is an expert, and a router picks ranks per token.

Legend: T tokens, I in_features, O out_features, r LoRA rank (= the number of rank experts), N assignments.

  route   RouterOutput over the r ranks = router(x_TI)   (any moekit router: top-k, top-p, ...)
  g_Tr    the router's weights scattered into (T, r); zero for ranks a token did not pick
  delta   = s * B (g_Tr * (A dropout(x)))                s = lora_alpha / r

The rank gate is the diagonal matrix of the paper's block-activation form (B diag(g) A x). A x is one
(T, r) GEMM for all ranks, as a LoRA of rank r costs; the gate zeroes the ranks a token did not pick.
"""

from __future__ import annotations

import torch
from torch import nn

from moekit.adapters.config import SMoRAConfig
from moekit.adapters.layer import AdapterLayer, RoutedMixin, lora_pair, register_layer


@register_layer
class SMoRALinear(RoutedMixin, AdapterLayer):
    config_class = SMoRAConfig

    def __init__(self, base_layer: nn.Linear, cfg: SMoRAConfig, index: int = 0):
        super().__init__(base_layer, cfg, index)
        self.lora_A, self.lora_B = lora_pair(self.in_features, cfg.r, self.out_features, self.device)
        self.router = self._build_router(cfg, self.in_features, cfg.r, self.device)

    def delta(self, x_TI: torch.Tensor) -> torch.Tensor:
        route = self._route(x_TI)
        gate_Tr = x_TI.new_zeros(x_TI.shape[0], self.cfg.r)
        gate_Tr = gate_Tr.index_put((route.token_idx_N, route.expert_idx_N), route.weight_N.to(x_TI.dtype),
                                    accumulate=True)
        return self.lora_B(self.lora_A(self.lora_dropout(x_TI)) * gate_Tr) * self.scaling
