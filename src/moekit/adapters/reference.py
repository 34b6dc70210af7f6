"""Plain formulas the adapter layers are tested against (test oracles, not production paths).

Legend: T tokens, I in_features, O out_features, r rank, E experts, N assignments.
"""

from __future__ import annotations

import torch


def mixture_reference(x_TI: torch.Tensor, token_N: torch.Tensor, expert_N: torch.Tensor, weight_N: torch.Tensor,
                      A_ErI: torch.Tensor, B_EOr: torch.Tensor, scaling: float) -> torch.Tensor:
    """delta_TO[t] = scaling * sum over assignments (t, e, w) of w * B_e A_e x_t, one expert at a time."""
    delta_TO = x_TI.new_zeros(x_TI.shape[0], B_EOr.shape[1])
    for e in range(A_ErI.shape[0]):
        rows_N = expert_N == e
        tokens = token_N[rows_N]
        if tokens.numel() == 0:
            continue
        y = (x_TI[tokens] @ A_ErI[e].T) @ B_EOr[e].T
        delta_TO = delta_TO.index_add(0, tokens, y * weight_N[rows_N].to(y.dtype).unsqueeze(-1))
    return delta_TO * scaling
