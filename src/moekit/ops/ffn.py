"""The expert FFN: the one place its math lives.

Legend: N rows (tokens or assignments), D model dim, F expert hidden dim, X = 2F (SwiGLU, [gate; up]
stacked) or F (GELU).

    SwiGLU (arXiv 2002.05202):  y = W_down (silu(W_gate x) * W_up x),  W_in = [W_gate; W_up] (2F, D)
    GELU:                       y = W_down gelu(W_up x),                 W_in = W_up (F, D)

Used by the routed experts (`moekit.experts.ExpertBank`, through the grouped GEMM), the reference
loop (`moekit.ops.reference`, through plain `F.linear`), the shared expert and offloaded experts
(`moekit.offload.runtime`, whose GEMMs run per cache step). It lives in ops, not experts, so that the
reference oracle (ops) can use it without importing a layer above it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = ["ACTIVATIONS", "expert_ffn", "hidden", "swiglu"]

ACTIVATIONS = ("swiglu", "gelu")


def swiglu(gate_NF: torch.Tensor, up_NF: torch.Tensor) -> torch.Tensor:
    return F.silu(gate_NF) * up_NF


def hidden(h_NX: torch.Tensor, activation: str) -> torch.Tensor:
    """The expert's hidden activation (N, F) from its input projection h_NX = x W_in^T: silu(gate) * up
    of the stacked [gate; up] (N, 2F) for SwiGLU, gelu(h) (N, F) for GELU. Raises ValueError for
    another activation."""
    if activation == "swiglu":
        gate_NF, up_NF = h_NX.chunk(2, dim=-1)
        return swiglu(gate_NF, up_NF)
    if activation == "gelu":
        return F.gelu(h_NX)
    raise ValueError(f"expert activation {activation!r} is unknown; expected one of {ACTIVATIONS}")


def expert_ffn(x_ND: torch.Tensor, w_in_XD: torch.Tensor, w_out_DF: torch.Tensor, activation: str,
               linear: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.linear) -> torch.Tensor:
    """y_ND = linear(hidden(linear(x_ND, w_in_XD)), w_out_DF), with `linear(x, w) = x @ w^T`: plain
    `F.linear` for one expert's weights, or a grouped GEMM over stacked (E, ., .) weights with rows
    grouped by expert (`ExpertBank`)."""
    return linear(hidden(linear(x_ND, w_in_XD), activation), w_out_DF)
