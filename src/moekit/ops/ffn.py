"""The expert FFN: the one place its math lives.

Legend: N rows (tokens or assignments), D model dim, F expert hidden dim, X = 2F (gated: [gate; up]
stacked, or interleaved [g0, u0, g1, u1, ...]) or F (non-gated).

    gated (GLU, arXiv 2002.05202):  y = W_down (act(W_gate x) * W_up x),  W_in = [W_gate; W_up] (2F, D)
    non-gated:                      y = W_down act(W_up x),                W_in = W_up (F, D)

Activations (`Activation.name`):
  gated      "swiglu" (SiLU; SwiGLU), "geglu" (exact GELU), "geglu_tanh" (tanh GELU), "reglu" (ReLU)
  non-gated  "gelu", "gelu_tanh", "relu", "relu2" (ReLU squared, arXiv 2109.08668), "silu"
A gated activation may also carry gpt-oss's clamped SwiGLU settings (openai/gpt-oss,
`gpt_oss/torch/model.py` `swiglu`): gate.clamp(max=limit), up.clamp(-limit, limit), the gate's SiLU
as gate * sigmoid(alpha * gate), and (up + up_offset) — limit 7, alpha 1.702, up_offset 1 there;
limit alone is DeepSeek-V4's clamped SiLU; with `clamp_after` the gate's clamp comes after its
activation, min(act(gate), limit) (Step-3.7's `Step3p7Experts._apply_gate`, its checkpoint's layers 43-44).
A SwiGLU may instead carry Inkling2's softcaps (c_g, c_u):
c_g tanh(gate / c_g) * sigmoid(gate) * c_u tanh(up / c_u), computed in fp32 (transformers' inkling2
`Inkling2SoftcappedSwiGLU`).

Used by the routed experts (`moekit.experts.ExpertBank`, through the grouped GEMM), the reference
loop (`moekit.ops.reference`, through plain `F.linear`), the shared expert and offloaded experts
(`moekit.offload.runtime`, whose GEMMs run per cache step). It lives in ops, not experts, so that the
reference oracle (ops) can use it without importing a layer above it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moekit.config import ACTIVATIONS
from moekit.config import GATED_ACTIVATIONS as GATED

__all__ = ["ACTIVATIONS", "GATED", "Activation", "act_fn", "expert_ffn", "hidden", "swiglu"]


# The elementwise function of each activation (a gated one applies it to the gate).
_FN: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "swiglu": F.silu, "silu": F.silu,
    "geglu": F.gelu, "gelu": F.gelu,
    "geglu_tanh": lambda h: F.gelu(h, approximate="tanh"), "gelu_tanh": lambda h: F.gelu(h, approximate="tanh"),
    "reglu": F.relu, "relu": F.relu,
    "relu2": lambda h: F.relu(h).square(),
}


@dataclass(frozen=True)
class Activation:
    """An expert's activation: `name` (one of ACTIVATIONS) and, for gated ones, gpt-oss's clamp
    settings (module doc): `limit` (None: no clamp), `alpha` (SwiGLU only; 1 is SiLU) and `up_offset`.
    `interleaved`: the projection's gate and up columns alternate (gpt-oss) instead of [gate; up].
    `clamp_after`: the gate is clamped after its activation (Step-3.7), not before (gpt-oss)."""

    name: str = "swiglu"
    limit: float | None = None
    alpha: float = 1.0
    up_offset: float = 0.0
    interleaved: bool = False
    clamp_after: bool = False
    softcap: tuple[float, float] | None = None  # (gate c, up c): Inkling2's softcapped SwiGLU (module doc)

    def __post_init__(self):
        if self.name not in ACTIVATIONS:
            raise ValueError(f"expert activation {self.name!r} is unknown; expected one of {ACTIVATIONS}")
        if not self.gated and (self.limit is not None or self.alpha != 1.0 or self.up_offset or self.interleaved):
            raise ValueError(f"expert activation {self.name!r} is not gated: limit, alpha, up_offset and "
                             "interleaved apply to gated activations only")
        if self.clamp_after and self.limit is None:
            raise ValueError("clamp_after=True needs a limit (the clamp it places after the activation)")
        if self.alpha != 1.0 and self.name != "swiglu":
            raise ValueError(f"alpha={self.alpha} applies to 'swiglu' only, not {self.name!r}")
        if self.softcap is not None and (self.name != "swiglu" or self.limit is not None or self.alpha != 1.0
                                         or self.up_offset or min(self.softcap) <= 0):
            raise ValueError(f"softcap={self.softcap} applies to a plain 'swiglu' only, with two caps > 0")

    @property
    def gated(self) -> bool:
        return self.name in GATED

    def __call__(self, h_NX: torch.Tensor, scratch: bool = False) -> torch.Tensor:
        """The hidden activation (N, F) from the input projection h_NX = x W_in^T.

        scratch=True: h_NX is the caller's own temporary, which a gated activation may overwrite when no
        gradient is recorded for it (inference: `glu_` on its gate and up halves, the same values with one
        new (N, F) tensor instead of up to six); otherwise ignored."""
        if not self.gated:
            return _FN[self.name](h_NX)
        if self.interleaved:
            gate_NF, up_NF = h_NX[..., ::2], h_NX[..., 1::2]
        else:
            gate_NF, up_NF = h_NX.chunk(2, dim=-1)
        if scratch and self.softcap is None and not (torch.is_grad_enabled() and h_NX.requires_grad):
            return self.glu_(gate_NF, up_NF)
        return self.glu(gate_NF, up_NF)

    def glu(self, gate_NF: torch.Tensor, up_NF: torch.Tensor) -> torch.Tensor:
        """act(gate) * up, with the clamp settings (a gated activation)."""
        if self.softcap is not None:  # c_g tanh(g / c_g) * sigmoid(g) * c_u tanh(u / c_u), in fp32
            (c_g, c_u), dtype = self.softcap, gate_NF.dtype
            g, u = gate_NF.float(), up_NF.float()
            return (torch.tanh(g / c_g) * c_g * torch.sigmoid(g) * (torch.tanh(u / c_u) * c_u)).to(dtype)
        if self.limit is not None:
            if not self.clamp_after:
                gate_NF = gate_NF.clamp(max=self.limit)
            up_NF = up_NF.clamp(min=-self.limit, max=self.limit)
        if self.alpha != 1.0:
            a_NF = gate_NF * torch.sigmoid(self.alpha * gate_NF)
        else:
            a_NF = _FN[self.name](gate_NF)
        if self.clamp_after:
            a_NF = a_NF.clamp(max=self.limit)
        return a_NF * (up_NF + self.up_offset) if self.up_offset else a_NF * up_NF

    def glu_(self, gate_NF: torch.Tensor, up_NF: torch.Tensor) -> torch.Tensor:
        """`glu` computed in place: the clamps and the up offset overwrite gate_NF and up_NF (views of a
        scratch tensor that records no gradient), and one new (N, F) tensor holds the result. The same
        operations in the same order as `glu` (bitwise equal), without its temporaries: on CPU each fresh
        (N, F) tensor of a prefill-sized call is new memory to fault in. No softcap (use `glu`).
        Interleaved columns (gpt-oss: gate and up are stride-2 views) are clamped into new contiguous tensors
        instead: CPU elementwise ops on stride-2 operands run unvectorised, and the in-place clamps and the ops
        after them on such views took 2.2x as long (N=128, F=512: 264 vs 121 us, one thread, AVX-512 EPYC); a
        clamp's values do not depend on where it writes (same bits)."""
        clamp_gate = self.limit is not None and not self.clamp_after
        strided = gate_NF.stride(-1) != 1 or up_NF.stride(-1) != 1
        if self.limit is not None:
            up_NF = (up_NF.clamp(min=-self.limit, max=self.limit) if strided
                     else up_NF.clamp_(min=-self.limit, max=self.limit))
        if self.alpha != 1.0:
            if clamp_gate:
                gate_NF = gate_NF.clamp(max=self.limit) if strided else gate_NF.clamp_(max=self.limit)
            a_NF = torch.mul(gate_NF, self.alpha).sigmoid_().mul_(gate_NF)  # gate * sigmoid(alpha * gate)
        else:
            # the function of the operand `glu` gives it (a clamped contiguous copy, or the view): CPU kernels of
            # transcendental functions on strided and contiguous operands may differ in the last bit
            a_NF = _FN[self.name](gate_NF.clamp(max=self.limit) if clamp_gate else gate_NF)
        if self.clamp_after:
            a_NF.clamp_(max=self.limit)
        return a_NF.mul_(up_NF.add_(self.up_offset) if self.up_offset else up_NF)

    def describe(self) -> str:
        parts = [self.name]
        if self.limit is not None:
            parts.append(f"limit={self.limit:g}{' after act' if self.clamp_after else ''}")
        if self.alpha != 1.0:
            parts.append(f"alpha={self.alpha:g}")
        if self.up_offset:
            parts.append(f"up+{self.up_offset:g}")
        if self.interleaved:
            parts.append("interleaved")
        if self.softcap is not None:
            parts.append(f"softcap={self.softcap[0]:g}/{self.softcap[1]:g}")
        return " ".join(parts)


def act_fn(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The elementwise function of activation `name` (ValueError for an unknown name)."""
    if name not in _FN:
        raise ValueError(f"expert activation {name!r} is unknown; expected one of {ACTIVATIONS}")
    return _FN[name]


def swiglu(gate_NF: torch.Tensor, up_NF: torch.Tensor) -> torch.Tensor:
    return F.silu(gate_NF) * up_NF


def _as_activation(activation: str | Activation) -> Activation:
    return activation if isinstance(activation, Activation) else Activation(activation)


def hidden(h_NX: torch.Tensor, activation: str | Activation) -> torch.Tensor:
    """The expert's hidden activation (N, F) from its input projection h_NX = x W_in^T: act(gate) * up
    of the stacked [gate; up] (N, 2F) for a gated activation, act(h) (N, F) otherwise. Raises
    ValueError for an unknown activation."""
    return _as_activation(activation)(h_NX)


def expert_ffn(x_ND: torch.Tensor, w_in_XD: torch.Tensor | tuple[torch.Tensor, torch.Tensor], w_out_DF: torch.Tensor,
               activation: str | Activation,
               linear: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.linear,
               b_in_X: torch.Tensor | None = None, b_out_D: torch.Tensor | None = None,
               expert_N: torch.Tensor | None = None, hidden_dropout: float = 0.0) -> torch.Tensor:
    """y_ND = linear(dropout(hidden(linear(x_ND, w_in_XD) + b_in)), w_out_DF) + b_out, with `linear(x, w) =
    x @ w^T`: plain `F.linear` for one expert's weights, or a grouped GEMM over stacked (E, ., .)
    weights with rows grouped by expert (`ExpertBank`). `w_in_XD` may be a pair (W_gate, W_up) of
    separate (F, D) projections (gated activations only). Biases broadcast against the rows: (X,) /
    (D,) for one expert, or (N, X) / (N, D) per row; with `expert_N` (N,) int64, the expert of each
    row, they are per expert, (E, X) / (E, D), and each row gets its expert's. `hidden_dropout` p > 0:
    dropout on the hidden activations (Switch Transformers' and NLLB-MoE's expert MLPs in training; the
    caller passes 0 in eval).
    `linear` returns a new tensor, which this function may overwrite (biases added and the gated
    activation computed in place) when it records no gradient."""
    act = _as_activation(activation)
    if isinstance(w_in_XD, tuple):
        if not act.gated or act.interleaved or b_in_X is not None:
            raise ValueError("separate gate and up projections need a gated, non-interleaved activation "
                             "without an input bias")
        h_NF = act.glu(linear(x_ND, w_in_XD[0]), linear(x_ND, w_in_XD[1]))
    else:
        h_NF = act(_add_bias(linear(x_ND, w_in_XD), b_in_X, expert_N), scratch=True)
    if hidden_dropout:
        h_NF = F.dropout(h_NF, hidden_dropout)
    return _add_bias(linear(h_NF, w_out_DF), b_out_D, expert_N)


def _add_bias(h_NX: torch.Tensor, b: torch.Tensor | None, expert_N: torch.Tensor | None) -> torch.Tensor:
    """h_NX + b (see expert_ffn; per expert b (E, X) with expert_N), in place where no gradient is recorded."""
    if b is None:
        return h_NX
    if expert_N is not None:
        b = b.index_select(0, expert_N)  # (N, X): index_select, not b[expert_N] (aten::index is slower)
    if (torch.is_grad_enabled() and (h_NX.requires_grad or b.requires_grad)) or b.dtype != h_NX.dtype:
        return h_NX + b  # (another dtype: promoted, as in place it would not be)
    return h_NX.add_(b)
