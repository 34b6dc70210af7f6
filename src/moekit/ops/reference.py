"""Plain PyTorch references: the test oracle for every fast path (not a production branch).

Legend: T tokens, D model dim, E experts, F expert hidden dim, N assignments, M the assignments of
one expert.

`moe_reference` runs the whole routed computation as a loop over experts, reading only the
ragged (token, expert, weight) assignment: for each expert, gather its tokens, run its FFN
(moekit.ops.ffn, with plain F.linear), scale by the weight and add into the output.
"""

from __future__ import annotations

import torch

from moekit.ops.ffn import expert_ffn


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
        w_in = experts.gate_up_proj[e] if experts.activation == "swiglu" else experts.up_proj[e]
        out_MD = expert_ffn(x_TD[tok_M], w_in, experts.down_proj[e], experts.activation)
        y_TD = y_TD.index_add(0, tok_M, out_MD * weight_N[sel_N].unsqueeze(-1).to(out_MD.dtype))
    return y_TD
