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
        w_in, w_out, b_in, b_out = experts.expert(e)
        out_MD = expert_ffn(x_TD[tok_M], w_in, w_out, experts.act, b_in_X=b_in, b_out_D=b_out)
        y_TD = y_TD.index_add(0, tok_M, out_MD * weight_N[sel_N].unsqueeze(-1).to(out_MD.dtype))
    return y_TD


class ReferenceExperts(torch.nn.Module):
    """Test oracle with an ExpertBank's interface: `forward(x_ND, offsets_E)` over rows grouped by expert,
    computed by `moe_reference` (each row its own token, weight 1) on `bank`'s stacked weights (shared,
    not copied). Put it in a MoELayer's place of `experts` to run a whole model on the reference loop."""

    def __init__(self, bank):
        super().__init__()
        self.bank = bank
        self.num_experts, self.d_model, self.activation = bank.num_experts, bank.d_model, bank.activation
        self.act, self.layout = bank.act, bank.layout

    # The bank's stacked weights, read through (so code that reads `layer.experts.down_proj` still works).
    gate_up_proj = property(lambda self: self.bank.gate_up_proj)
    up_proj = property(lambda self: self.bank.up_proj)
    gate_proj = property(lambda self: self.bank.gate_proj)
    in_proj_bias = property(lambda self: self.bank.in_proj_bias)
    down_proj_bias = property(lambda self: self.bank.down_proj_bias)
    expert = property(lambda self: self.bank.expert)
    down_proj = property(lambda self: self.bank.down_proj)

    def forward(self, x_ND: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
        N = x_ND.shape[0]
        counts_E = torch.diff(offsets_E.long(), prepend=offsets_E.new_zeros(1, dtype=torch.int64))
        expert_N = torch.repeat_interleave(torch.arange(self.num_experts, device=x_ND.device), counts_E, output_size=N)
        rows_N = torch.arange(N, device=x_ND.device)
        return moe_reference(x_ND, rows_N, expert_N, x_ND.new_ones(N), self.bank)
