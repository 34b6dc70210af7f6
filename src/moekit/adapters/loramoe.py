"""LoRAMoE (arXiv 2312.09979), as its reference code computes it (Ablustrund/LoRAMoE, peft/tuners/lora.py).

Legend: B sequences, T tokens (B x positions when the input has a batch dim), I in_features,
O out_features, r LoRA rank, E experts.

  w_TE   = softmax(lora_route(x))                    dense soft gate over all experts, fp32
  delta  = s * sum_e w_Te * B_e A_e dropout(x)       s = lora_alpha / r
  blc    = cv^2( (sum over positions of w_BTE) * C_BE )   localized balancing constraint (see
           LoRAMoEConfig): C = 1 + blc_alpha where an expert's half matches the sample's task type,
           1 - blc_alpha elsewhere; cv^2 = var / (mean^2 + 1e-10) over all B*E entries (unbiased var)

NOTE: the reference draws a fresh dropout mask for each expert; here one mask is shared by all
experts (E masks would build a T x E x I tensor). They agree in eval mode and with dropout 0.
The expert sum runs as two einsums through (T, E, r): nothing of size T x E x I or T x E x O.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from moekit.adapters.config import LoRAMoEConfig
from moekit.adapters.layer import AdapterLayer, init_expert_A, register_layer
from moekit.errors import UsageError


def cv_squared(v: torch.Tensor) -> torch.Tensor:
    """The squared coefficient of variation var / (mean^2 + 1e-10) (unbiased var; 0 for one value),
    as the reference's `cv_squared`."""
    if v.numel() == 1:
        return v.new_zeros(()).float()
    v = v.float()
    return v.var() / (v.mean() ** 2 + 1e-10)


def localized_balance_loss(w_BTE: torch.Tensor, task_types_B: torch.Tensor, blc_alpha: float) -> torch.Tensor:
    """cv^2 of the per-sequence expert importance weighted by the task-type coefficients (the reference's
    `blcls` before `blc_weight`). task_types_B: 0 or 1 per sequence; type 1 favours experts [0, E/2)."""
    B, T, E = w_BTE.shape
    half = E // 2
    types_B1 = task_types_B.view(-1, 1).to(w_BTE.device)
    own_BE = torch.cat([(types_B1 == 1).expand(B, half), (types_B1 == 0).expand(B, E - half)], dim=-1)
    coef_BE = torch.where(own_BE, 1.0 + blc_alpha, 1.0 - blc_alpha).to(w_BTE.dtype)
    return cv_squared((w_BTE.sum(dim=1) * coef_BE).flatten())


@register_layer
class LoRAMoELinear(AdapterLayer):
    """`num_experts` LoRA experts (lora_A (E, r, I), lora_B (E, O, r)) gated densely by `lora_route`
    (nn.Linear(I, E), Kaiming-uniform initialised as in the reference)."""

    config_class = LoRAMoEConfig

    def __init__(self, base_layer: nn.Linear, cfg: LoRAMoEConfig, index: int = 0):
        super().__init__(base_layer, cfg, index)
        E, r = cfg.num_experts, cfg.r
        self.lora_route = nn.Linear(self.in_features, E, bias=False, device=self.device)
        nn.init.kaiming_uniform_(self.lora_route.weight, a=math.sqrt(5))
        self.lora_A = nn.Parameter(torch.empty(E, r, self.in_features, device=self.device))
        self.lora_B = nn.Parameter(torch.zeros(E, self.out_features, r, device=self.device))
        init_expert_A(self.lora_A)
        self.task_types_B: torch.Tensor | None = None  # set by moekit.adapters.task_types
        self.last_gate_TE: torch.Tensor | None = None

    def delta(self, x_TI: torch.Tensor) -> torch.Tensor:
        w_TE = torch.softmax(self.lora_route(x_TI).float(), dim=-1).to(x_TI.dtype)
        self.last_gate_TE = w_TE.detach()
        h_TEr = torch.einsum("ti,eri->ter", self.lora_dropout(x_TI), self.lora_A)
        delta_TO = torch.einsum("ter,eor->to", h_TEr * w_TE.unsqueeze(-1), self.lora_B) * self.scaling
        self.aux = {}
        if torch.is_grad_enabled() and self.task_types_B is not None and self.cfg.blc_weight > 0:
            self.aux["localized_balance"] = localized_balance_loss(self._per_sequence(w_TE), self.task_types_B,
                                                                   self.cfg.blc_alpha)
        return delta_TO

    def _per_sequence(self, w_TE: torch.Tensor) -> torch.Tensor:
        lead = self._lead_shape
        B = lead[0] if len(lead) >= 2 else 1
        if self.task_types_B.numel() != B:
            raise UsageError(f"task_types: {self.task_types_B.numel()} task types for a batch of {B} sequences")
        return w_TE.view(B, -1, w_TE.shape[-1])

    def aux_loss(self) -> torch.Tensor | None:
        if "localized_balance" not in self.aux:
            return None
        return self.cfg.blc_weight * self.aux["localized_balance"]
