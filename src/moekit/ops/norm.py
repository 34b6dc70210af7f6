"""RMSNorm in the forms pretrained MoE blocks use around their experts (the one place its math lives).

Legend: N rows, W the normalised width. With r(v) = v / sqrt(mean(v^2) + eps) over the last dim and a
learned weight w (W,), computed in fp32 and cast back to the input dtype:
  "weight"          r(x) * w                  (LLaMA's RMSNorm, arXiv 1910.07467)
  "one_plus"        r(x) * (1 + w)            (Gemma's: w starts at 0; transformers' muse_spark
                                               `MuseSparkTextCenteredRMSNorm`)
  "one_plus_input"  r(x * (1 + w))            (the weight scales the input before normalising;
                                               transformers' muse_spark `MuseSparkTextInputScaledRMSNorm`,
                                               rounded to the input dtype in between as there)
"""

from __future__ import annotations

import torch
from torch import nn

from moekit.config import NORM_FORMS

__all__ = ["NORM_FORMS", "FormRMSNorm"]


class FormRMSNorm(nn.Module):
    """RMSNorm over the last dim of x (..., W) in one of NORM_FORMS (module doc); `weight` (W,) starts at
    1 for "weight" and 0 for the (1 + w) forms, so that a new norm is r(x). ValueError for an unknown form."""

    def __init__(self, width: int, eps: float, form: str = "weight"):
        super().__init__()
        if form not in NORM_FORMS:
            raise ValueError(f"RMSNorm form {form!r} is unknown; expected one of {NORM_FORMS}")
        self.eps, self.form = float(eps), form
        self.weight = nn.Parameter(torch.ones(width) if form == "weight" else torch.zeros(width))

    def _r(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # 1 + w in the weight's own dtype, then fp32, as transformers computes it (bf16 weights round there).
        scale = self.weight.float() if self.form == "weight" else (1.0 + self.weight).float()
        if self.form == "one_plus_input":
            return self._r((x.float() * scale).to(x.dtype).float()).to(x.dtype)
        return (self._r(x.float()) * scale).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps:g}, form={self.form}"
