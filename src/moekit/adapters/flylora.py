"""FlyLoRA (NeurIPS 2025, "Implicit Rank-Wise Mixture-of-Experts"), as the authors' PEFT fork computes it
(gfyddha/FlyLoRA, peft/src/peft/tuners/lora/layer.py, the lines marked "modified").

Legend: T tokens, I in_features, O out_features, r rank, k active ranks.

  A       (r, I) frozen sparse random projection: each row has p = I // (r // k) non-zeros drawn from
          N(0, (1/r)^2) (init "sparse"); a buffer, never trained
  act_Tr  = A dropout(x), computed without autograd (the fork runs it under torch.no_grad(), so no
          gradient reaches x through this path)
  pick    the k ranks with the largest act + b (signed values, not magnitudes: the fork's rule; its
          minimal `flylora.py` ranks |act + b| instead)
  delta   = s * B (act * mask_pick)                        s = lora_alpha / r; only B trains
  balance b_i += bias_rate * sign(mean_j c_j - c_i), c the picks per rank (reference: bias_u)

NOTE: the fork updates b after every forward (eval included); here the picks of the optimiser step's
training forwards are counted and b moves once per step (`after_optimizer_step`), the rule every
stateful router in moekit follows; with one forward per step the two agree.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moekit.adapters.config import FlyLoRAConfig
from moekit.adapters.layer import AdapterLayer, register_layer


def sparse_projection(r: int, in_features: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """The fork's "sparse" init of A: N(0, (1/r)^2) entries, in_features // (r // k) kept per row."""
    p = in_features // (r // k)
    A_rI = torch.randn(r, in_features, generator=generator) / r
    mask_rI = torch.zeros(r, in_features, dtype=torch.bool)
    for i in range(r):
        mask_rI[i, torch.randperm(in_features, generator=generator)[:p]] = True
    return A_rI * mask_rI


@register_layer
class FlyLoRALinear(AdapterLayer):
    config_class = FlyLoRAConfig

    def __init__(self, base_layer: nn.Linear, cfg: FlyLoRAConfig, index: int = 0):
        super().__init__(base_layer, cfg, index)
        generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + index)
        self.register_buffer("lora_A", sparse_projection(cfg.r, self.in_features, cfg.k, generator).to(self.device))
        self.lora_B = nn.Linear(cfg.r, self.out_features, bias=False, device=self.device)
        nn.init.zeros_(self.lora_B.weight)
        self.register_buffer("lora_topk_bias", torch.zeros(cfg.r, device=self.device))
        self.register_buffer("step_counts_r", torch.zeros(cfg.r, dtype=torch.int64, device=self.device),
                             persistent=False)

    def adapter_dtype(self) -> torch.dtype:
        return self.lora_B.weight.dtype

    def delta(self, x_TI: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            act_Tr = F.linear(self.lora_dropout(x_TI), self.lora_A.to(x_TI.dtype))
        pick_Tk = torch.topk(act_Tr + self.lora_topk_bias.to(act_Tr.dtype), self.cfg.k, dim=-1).indices
        mask_Tr = torch.zeros_like(act_Tr).scatter_(-1, pick_Tk, 1.0)
        if self.training and torch.is_grad_enabled():
            self.step_counts_r += torch.bincount(pick_Tk.flatten(), minlength=self.cfg.r)
        return self.lora_B(act_Tr * mask_Tr) * self.scaling

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        c_r = self.step_counts_r.float()
        if self.cfg.bias_rate > 0 and c_r.sum() > 0:
            self.lora_topk_bias += self.cfg.bias_rate * torch.sign(c_r.mean() - c_r)
        self.step_counts_r.zero_()
