"""Routed experts as stacked weights, and the always-on shared expert.

Legend: N assignments (rows grouped by expert), D model dim, E experts, F expert hidden dim.

Weights use the transformers v5 layout so a pretrained block can be wrapped without a copy:
  SwiGLU: gate_up_proj (E, 2F, D) with [gate; up] concatenated, down_proj (E, D, F)
  GELU:   up_proj (E, F, D), down_proj (E, D, F)
"""

from __future__ import annotations

import torch
from torch import nn

from moekit.ops.ffn import expert_ffn, hidden, swiglu
from moekit.ops.grouped import grouped_linear


class ExpertBank(nn.Module):
    def __init__(self, num_experts: int, d_model: int, d_expert: int, activation: str = "swiglu"):
        super().__init__()
        self.num_experts, self.d_model, self.d_expert, self.activation = num_experts, d_model, d_expert, activation
        if activation == "swiglu":
            self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * d_expert, d_model))
            self.up_proj = None
        else:
            self.gate_up_proj = None
            self.up_proj = nn.Parameter(torch.empty(num_experts, d_expert, d_model))
        self.down_proj = nn.Parameter(torch.empty(num_experts, d_model, d_expert))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for w in (self.gate_up_proj, self.up_proj, self.down_proj):
            if w is not None:
                nn.init.normal_(w, std=w.shape[-1] ** -0.5)

    def forward(self, x_ND: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
        """Each row through its expert's FFN (moekit.ops.ffn); rows sorted by expert, offsets_E int32 ends."""
        return expert_ffn(x_ND, self.w_in, self.down_proj, self.activation,
                          linear=lambda h, w_EOI: grouped_linear(h, w_EOI, offsets_E))

    @property
    def w_in(self) -> torch.Tensor:
        """The stacked input projection: gate_up_proj (E, 2F, D) for SwiGLU, up_proj (E, F, D) for GELU."""
        return self.gate_up_proj if self.activation == "swiglu" else self.up_proj

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, d_model={self.d_model}, d_expert={self.d_expert}, {self.activation}"


class SharedExpert(nn.Module):
    """A dense FFN every token uses (DeepSeekMoE / Qwen2-MoE). Names follow transformers' MLPs."""

    def __init__(self, d_model: int, width: int, activation: str = "swiglu"):
        super().__init__()
        self.activation = activation
        self.gate_proj = nn.Linear(d_model, width, bias=False) if activation == "swiglu" else None
        self.up_proj = nn.Linear(d_model, width, bias=False)
        self.down_proj = nn.Linear(width, d_model, bias=False)

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        if self.gate_proj is not None:
            return self.down_proj(swiglu(self.gate_proj(x_TD), self.up_proj(x_TD)))
        return self.down_proj(hidden(self.up_proj(x_TD), "gelu"))
