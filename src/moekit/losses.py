"""Auxiliary router losses as pure functions (fp32). Callers scale and add them.

Legend: B sequences, T tokens, E experts.

What f counts: the router's choices over valid tokens *before* any capacity dropping (Switch
Transformer, Megatron-LM): counting only executed assignments would let a collapsed router look
balanced (with a capacity limit every expert's executed count is capped). For top-k routers with a
selection bias or a group limit, the plain top-k of the unbiased scores (Megatron-LM's
`compute_routing_scores_for_aux_loss`, DeepSeek-V3 eq. 18); see `Router.balance_assignment`.

What P averages: probabilities. Sigmoid scores are first normalised per token, s_i / sum_j s_j
(`token_normalized`, as Megatron-LM), otherwise shifting every logit down lowers the loss without
balancing anything.

Normalisation (NOTE, a choice): f_i is the fraction of (valid) tokens that chose expert i, so
sum_i f_i = average experts per token, and the Switch loss E * sum_i f_i * P_i equals k at perfect
balance for top-k (transformers' convention, and the top-p paper's). Megatron divides f by k
(minimum 1): a Megatron coefficient alpha_M corresponds to alpha = alpha_M / k here.
"""

from __future__ import annotations

import torch

from moekit.utils.counts import count_ids


def _masked_mean(v_T: torch.Tensor, valid_T: torch.Tensor | None) -> torch.Tensor:
    if valid_T is None:
        return v_T.mean() if v_T.numel() else v_T.new_zeros(())
    n = valid_T.sum().clamp(min=1)
    return (v_T * valid_T).sum() / n


def token_normalized(scores_TE: torch.Tensor) -> torch.Tensor:
    """Scores normalised per token, s_i / (sum_j s_j + 1e-20): what the balance losses average for
    sigmoid routers (Megatron-LM `compute_routing_scores_for_aux_loss`; DeepSeek-V3 eq. 19)."""
    s = scores_TE.float()
    return s / (s.sum(dim=-1, keepdim=True) + 1e-20)


def load_balance_loss(scores_TE: torch.Tensor, counts_E: torch.Tensor, num_tokens: int | torch.Tensor,
                      valid_T: torch.Tensor | None = None) -> torch.Tensor:
    """Switch Transformer loss (arXiv 2101.03961): E * sum_i f_i * P_i.

    scores_TE: router probabilities (per-token normalised scores for sigmoid routers, see
    `token_normalized`); counts_E: the router's chosen assignments per expert over valid tokens,
    before capacity dropping (no gradient); num_tokens: number of valid tokens those counts come
    from; P_i = mean probability over valid tokens (carries the gradient).
    """
    E = scores_TE.shape[-1]
    # sym_max, not max(float(...)): a token count that is a traced (dynamic) size stays symbolic.
    denom = num_tokens.clamp(min=1) if isinstance(num_tokens, torch.Tensor) else torch.sym_max(num_tokens, 1)
    f_E = counts_E.detach().float() / denom
    if valid_T is None:
        P_E = scores_TE.float().mean(dim=0) if scores_TE.shape[0] else scores_TE.new_zeros(E)
    else:
        P_E = (scores_TE.float() * valid_T.unsqueeze(-1)).sum(0) / valid_T.sum().clamp(min=1)
    return E * (f_E * P_E).sum()


def global_load_balance_loss(scores_TE: torch.Tensor, f_E: torch.Tensor,
                             valid_T: torch.Tensor | None = None) -> torch.Tensor:
    """Global-batch balance ("Demons in the Detail", arXiv 2501.11873, eq. 3): the Switch loss with
    f_E from counts accumulated over the step's micro-batches and data-parallel ranks (the caller
    accumulates); P_i stays local to this micro-batch. Same scale as `load_balance_loss`."""
    return load_balance_loss(scores_TE, f_E, 1, valid_T)


def z_loss(logits_TE: torch.Tensor, valid_T: torch.Tensor | None = None) -> torch.Tensor:
    """Router z-loss (ST-MoE, arXiv 2202.08906): mean over tokens of logsumexp(logits)^2."""
    return _masked_mean(torch.logsumexp(logits_TE.float(), dim=-1) ** 2, valid_T)


def sequence_balance_loss(scores_BTE: torch.Tensor, expert_idx_N: torch.Tensor, token_idx_N: torch.Tensor,
                          k: float, valid_BT: torch.Tensor | None = None) -> torch.Tensor:
    """DeepSeek-V3 sequence-wise balance loss (arXiv 2412.19437, eq. 17-20), averaged over sequences.

    Per sequence: f_i = E / (k * T) * #tokens choosing i;  P_i = mean_t s'_{t,i} with s' the scores
    normalised per token;  L = sum_i f_i * P_i (= 1 at perfect balance).
    (token_idx_N, expert_idx_N): the plain top-k of the *unbiased* scores (eq. 18: no selection
    bias, no group limit; Megatron-LM counts the same), over valid tokens; token_idx_N indexes the
    flattened (B*T) tokens. Sequences that are all padding do not count; empty input gives 0.
    """
    B, T, E = scores_BTE.shape
    if B * T == 0:
        return scores_BTE.sum() * 0.0  # zero, still attached to the graph
    seq_N = token_idx_N // T
    counts_BE = count_ids(seq_N * E + expert_idx_N, B * E).view(B, E).float()
    if valid_BT is None:
        valid_BT = torch.ones(B, T, dtype=torch.bool, device=scores_BTE.device)
    t_B = valid_BT.sum(1).clamp(min=1).float()
    f_BE = counts_BE * E / (k * t_B.unsqueeze(-1))
    s = token_normalized(scores_BTE)  # eq. 19
    P_BE = (s * valid_BT.unsqueeze(-1)).sum(1) / t_B.unsqueeze(-1)
    has_B = valid_BT.any(1)  # sequences that are all padding do not count in the mean
    return ((f_BE * P_BE).sum(-1) * has_B).sum() / has_B.sum().clamp(min=1)
