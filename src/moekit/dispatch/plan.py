"""Sort-based dropless dispatch, with an optional capacity limit.

Legend: T tokens, D model dim, E experts, N assignments (after dropping: N_kept).

Stages:
  1. make_plan: stable sort of the assignments by expert -> counts_E, int32 offsets_E; with a
     capacity, each expert keeps its first C assignments in token order (Switch Transformer,
     arXiv 2101.03961) and the rest are dropped and counted.
  2. permute:  x_ND = x_TD[token_N]            (rows grouped by expert)
  3. experts:  y_ND = grouped FFN(x_ND)        (see moekit.experts)
  4. combine:  y_TD = sum_n weight_n * y_n scattered to token_n (index_add, fp32 accumulation)
Nothing of size T x E x D is ever built.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from moekit.utils.counts import count_ids


@dataclass
class DispatchPlan:
    token_N: torch.Tensor  # (N_kept,) int64, grouped by expert
    expert_N: torch.Tensor  # (N_kept,) int64, non-decreasing
    weight_N: torch.Tensor  # (N_kept,) combine weights (carry the router's gradient)
    counts_E: torch.Tensor  # (E,) int64 executed assignments per expert
    offsets_E: torch.Tensor  # (E,) int32 cumulative counts, for the grouped GEMM
    num_dropped: int  # assignments removed by the capacity limit


def make_plan(token_idx_N: torch.Tensor, expert_idx_N: torch.Tensor, weight_N: torch.Tensor,
              num_experts: int, capacity_factor: float | None = None,
              keep_N: torch.Tensor | None = None) -> DispatchPlan:
    """keep_N (bool, optional): assignments a capacity rule of the caller's kept; the others are dropped
    (and counted) before capacity_factor's cap."""
    num_dropped = 0
    if keep_N is not None and not bool(keep_N.all()):
        num_dropped = int((~keep_N).sum())
        token_idx_N, expert_idx_N, weight_N = token_idx_N[keep_N], expert_idx_N[keep_N], weight_N[keep_N]
    expert_N, order_N = torch.sort(expert_idx_N, stable=True)  # the sorted ids come with the order: no gather
    counts_E = count_ids(expert_idx_N, num_experts)  # not bincount: see moekit.utils.counts
    if capacity_factor is not None and expert_N.numel() > 0:
        capacity = math.ceil(capacity_factor * expert_N.numel() / num_experts)
        starts_E = torch.cumsum(counts_E, 0) - counts_E
        rank_N = torch.arange(expert_N.numel(), device=expert_N.device) - starts_E[expert_N]
        keep_N = rank_N < capacity
        over = int(expert_N.numel() - keep_N.sum())
        num_dropped += over
        if over:
            order_N, expert_N = order_N[keep_N], expert_N[keep_N]
            counts_E = counts_E.clamp(max=capacity)
    offsets_E = torch.cumsum(counts_E, 0, dtype=torch.int32)
    return DispatchPlan(token_idx_N[order_N], expert_N, weight_N[order_N], counts_E, offsets_E, num_dropped)


def permute(x_TD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    return x_TD.index_select(0, plan.token_N)


def combine(y_ND: torch.Tensor, plan: DispatchPlan, num_tokens: int, out_dtype: torch.dtype) -> torch.Tensor:
    """y_TD[t] = sum over t's assignments of weight * y_n, accumulated in fp32 (or wider)."""
    return combine_rows(y_ND, plan.weight_N, plan.token_N, num_tokens, out_dtype)


def combine_rows(y_ND: torch.Tensor, weight_N: torch.Tensor | None, token_N: torch.Tensor, num_tokens: int,
                 out_dtype: torch.dtype, scratch: bool = False) -> torch.Tensor:
    """`combine` of rows y_ND (N, D) with their weights (N,) and tokens (N,) int64, without a plan.
    weight_N None: the rows summed unweighted (Llama 4 weighted the experts' inputs). scratch=True: y_ND is a new
    tensor the caller drops and no gradient is recorded, so it is weighted in place (the inference path)."""
    acc_dtype = torch.promote_types(y_ND.dtype if weight_N is None else torch.promote_types(y_ND.dtype, weight_N.dtype),
                                    torch.float32)
    acc_ND = y_ND if y_ND.dtype == acc_dtype else y_ND.to(acc_dtype)  # (.to of the same dtype still costs a call)
    if weight_N is not None:
        w_N1 = (weight_N if weight_N.dtype == acc_dtype else weight_N.to(acc_dtype)).unsqueeze(-1)
        acc_ND = acc_ND.mul_(w_N1) if scratch else acc_ND * w_N1
    y_TD = acc_ND.new_zeros(num_tokens, y_ND.shape[-1])
    y_TD = y_TD.index_add_(0, token_N, acc_ND) if scratch else y_TD.index_add(0, token_N, acc_ND)
    return y_TD if y_TD.dtype == out_dtype else y_TD.to(out_dtype)
