"""Plain formulas the adapter layers are tested against (test oracles, not production paths).

Legend: T tokens, I in_features, O out_features, r rank, E experts, N assignments, M the rows of one
expert.
"""

from __future__ import annotations

import torch

from moekit.ops.ffn import expert_ffn


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


def expert_lora_reference(x_ND: torch.Tensor, offsets_E: torch.Tensor, bank, lora_A: dict, lora_B: dict,
                          scaling: float) -> torch.Tensor:
    """Expert LoRA one expert at a time: the rows of expert e through its FFN (moekit.ops.ffn, plain
    F.linear) with every targeted stacked weight W replaced by W_e + scaling * B_e A_e (A (E, r, I),
    B (E, O, r); a 2-D A (r, I), B (O, r) is one pair shared by all experts). `bank`: the ExpertBank
    whose stacked weights are read; rows sorted by expert, offsets_E (E,) end offsets."""
    weights = {"w_in": "gate_up_proj" if bank.activation == "swiglu" else "up_proj", "w_out": "down_proj"}
    out = []
    start = 0
    for e, end in enumerate(offsets_E.tolist()):
        if end == start:
            continue
        w = {}
        for role, name in weights.items():
            W = getattr(bank, name)[e].to(x_ND.dtype)
            if name in lora_A:
                A, B = lora_A[name], lora_B[name]
                A_e, B_e = (A[e], B[e]) if A.dim() == 3 else (A, B)
                W = W + scaling * (B_e @ A_e).to(x_ND.dtype)
            w[role] = W
        out.append(expert_ffn(x_ND[start:end], w["w_in"], w["w_out"], bank.activation))
        start = end
    return torch.cat(out) if out else x_ND.new_zeros(0, bank.d_model)
