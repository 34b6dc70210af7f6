"""Plain PyTorch references: the test oracle for every fast path (not a production branch).

Legend: T tokens, D model dim, E experts, F expert hidden dim, N assignments.

`moe_reference` runs the whole routed computation as a loop over experts, reading only the
ragged (token, expert, weight) assignment: for each expert, gather its tokens, run its FFN,
scale by the weight and add into the output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def expert_ffn(x_MD: torch.Tensor, gate_up_FD: torch.Tensor | None, up_FD: torch.Tensor | None,
               down_DF: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "swiglu":
        gate_MF, up_MF = F.linear(x_MD, gate_up_FD).chunk(2, dim=-1)
        return F.linear(F.silu(gate_MF) * up_MF, down_DF)
    return F.linear(F.gelu(F.linear(x_MD, up_FD)), down_DF)


def moe_reference(x_TD: torch.Tensor, token_idx_N: torch.Tensor, expert_idx_N: torch.Tensor,
                  weight_N: torch.Tensor, experts) -> torch.Tensor:
    """y_TD = sum over assignments n of weight_n * FFN_{expert_n}(x_{token_n}).

    `experts` is an `ExpertBank` (its stacked weights are read, its fast forward is not used).
    """
    y_TD = torch.zeros_like(x_TD)
    for e in range(experts.num_experts):
        sel_N = expert_idx_N == e
        if not bool(sel_N.any()):
            continue
        tok_M = token_idx_N[sel_N]
        gate_up = experts.gate_up_proj[e] if experts.activation == "swiglu" else None
        up = experts.up_proj[e] if experts.activation == "gelu" else None
        out_MD = expert_ffn(x_TD[tok_M], gate_up, up, experts.down_proj[e], experts.activation)
        y_TD = y_TD.index_add(0, tok_M, out_MD * weight_N[sel_N].unsqueeze(-1).to(out_MD.dtype))
    return y_TD
