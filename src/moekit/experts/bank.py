"""Routed experts as stacked weights, and the always-on shared expert.

Legend: N assignments (rows grouped by expert), D model dim, E experts, F expert hidden dim, X = 2F
(gated) or F.

Weights use the transformers v5 layout so a pretrained block can be wrapped without a copy:
  gated (SwiGLU, GeGLU, ...): gate_up_proj (E, 2F, D) with [gate; up] concatenated, down_proj (E, D, F)
  non-gated (GELU, ReLU², ...): up_proj (E, F, D), down_proj (E, D, F)
A pretrained model that stores its experts otherwise is read in place through an `ExpertLayout`
(transposed, interleaved, separate or flat stacks, per-expert biases): the bank holds the model's
own Parameters and takes views of them at each forward; nothing is copied.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from moekit.ops.ffn import Activation, expert_ffn
from moekit.ops.grouped import grouped_linear, per_expert_ffn


@dataclass(frozen=True)
class ExpertLayout:
    """How a bank's weights are stored (the default is moekit's own, transformers v5's).

    in_transposed: the input projection is stored (E, D, X) and applied as x @ W (gpt-oss, Llama 4).
    out_transposed: the output projection is stored (E, F, D) (gpt-oss, Llama 4, DBRX's w2).
    interleaved: gate and up columns alternate, [g0, u0, g1, u1, ...] (gpt-oss).
    split: separate `gate_proj` and `up_proj` stacks instead of one `gate_up_proj` (DBRX w1, v1).
    flat: every stack is stored 2-D, (E * F, D) (DBRX), and viewed 3-D.
    bias: per-expert biases on the input projection (E, X) and the output (E, D) (gpt-oss).
    spare: the input stack holds this many unused rows after the E experts' (LongCat-Flash allocates
        gate_up_proj rows for its identity experts, which never read them); views take the first E.
    listed: no stacks: each expert is its own pair of Linear modules, `in_proj[e]` (F, D) and
        `out_proj[e]` (D, F), biases in them where `bias` (Switch Transformers' `wi`/`wo`, NLLB-MoE's
        `fc1`/`fc2`: a pretrained model's own modules, held in place); run by a per-expert loop;
        non-gated activations only.
    """

    in_transposed: bool = False
    out_transposed: bool = False
    interleaved: bool = False
    split: bool = False
    flat: bool = False
    bias: bool = False
    spare: int = 0
    listed: bool = False

    def describe(self) -> str:
        on = [name if value is True else f"{name}={value}" for name, value in vars(self).items() if value]
        return ", ".join(on) if on else "standard"


STANDARD = ExpertLayout()


class ExpertBank(nn.Module):
    def __init__(self, num_experts: int, d_model: int, d_expert: int, activation: str | Activation = "swiglu",
                 layout: ExpertLayout = STANDARD, hidden_dropout: float = 0.0):
        super().__init__()
        self.hidden_dropout = hidden_dropout  # on the hidden activations, in training (Switch, NLLB-MoE experts)
        act = activation if isinstance(activation, Activation) else Activation(activation)
        if layout.interleaved != act.interleaved:
            act = dataclasses.replace(act, interleaved=layout.interleaved)
        if layout.spare and (layout.flat or layout.split):
            raise ValueError(f"ExpertLayout(spare={layout.spare}) needs one stacked (E, ., .) input projection, got "
                             f"{layout.describe()}")
        if layout.split and (not act.gated or layout.interleaved or layout.bias):
            raise ValueError(f"ExpertLayout(split=True) needs a gated activation without interleaving or biases, "
                             f"got {act.describe()}, {layout.describe()}")
        if layout.listed and (act.gated or layout != ExpertLayout(listed=True, bias=layout.bias)):
            raise ValueError(f"ExpertLayout(listed=True) takes a non-gated activation and biases only, got "
                             f"{act.describe()}, {layout.describe()}")
        self.num_experts, self.d_model, self.d_expert = num_experts, d_model, d_expert
        self.act, self.activation, self.layout = act, act.name, layout
        E, D, Fdim = num_experts, d_model, d_expert
        X = 2 * Fdim if act.gated else Fdim
        self.in_proj = self.out_proj = None
        if layout.listed:
            self.gate_up_proj = self.gate_proj = self.up_proj = self.down_proj = None
            self.in_proj_bias = self.down_proj_bias = None
            self.in_proj = nn.ModuleList(nn.Linear(D, Fdim, bias=layout.bias) for _ in range(E))
            self.out_proj = nn.ModuleList(nn.Linear(Fdim, D, bias=layout.bias) for _ in range(E))
            return

        def stack(rows: int, cols: int, transposed: bool, spare: int = 0) -> nn.Parameter:
            n = E + spare
            shape = (E * rows, cols) if layout.flat else (n, cols, rows) if transposed else (n, rows, cols)
            return nn.Parameter(torch.empty(shape))

        self.gate_up_proj = self.gate_proj = self.up_proj = None
        if layout.split:
            self.gate_proj = stack(Fdim, D, layout.in_transposed)
            self.up_proj = stack(Fdim, D, layout.in_transposed)
        elif act.gated:
            self.gate_up_proj = stack(X, D, layout.in_transposed, layout.spare)
        else:
            self.up_proj = stack(X, D, layout.in_transposed, layout.spare)
        # Flat DBRX stacks hold every matrix as (F, D) rows: its output projection is the transposed one.
        self.down_proj = stack(Fdim, D, True) if layout.flat else stack(D, Fdim, layout.out_transposed)
        self.in_proj_bias = nn.Parameter(torch.empty(E, X)) if layout.bias else None
        self.down_proj_bias = nn.Parameter(torch.empty(E, D)) if layout.bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.layout.listed:
            return  # nn.Linear initialised its own
        for w in (self.gate_up_proj, self.gate_proj, self.up_proj, self.down_proj):
            if w is not None and not w.is_meta:
                fan_in = self.d_expert if w is self.down_proj else self.d_model
                nn.init.normal_(w, std=fan_in**-0.5)
        for b in (self.in_proj_bias, self.down_proj_bias):
            if b is not None and not b.is_meta:
                nn.init.zeros_(b)

    def forward(self, x_ND: torch.Tensor, offsets_E: torch.Tensor, expert_N: torch.Tensor | None = None) -> torch.Tensor:
        """Each row through its expert's FFN (moekit.ops.ffn); rows sorted by expert, offsets_E int32 ends.
        expert_N (N,) int64: the expert of each row where the caller has it (per-expert biases read it; found
        from offsets_E otherwise)."""
        X = 2 * self.d_expert if self.act.gated else self.d_expert
        # Separate modules, or (CPU inference, many rows) stacks whose hidden activations should stay in cache:
        # one plain FFN per expert that has rows (the same values as the grouped GEMMs', see per_expert_ffn).
        if self.layout.listed or per_expert_ffn(x_ND, X, self.num_experts):
            y_ND = x_ND.new_zeros(x_ND.shape[0], self.d_model)
            start = 0
            for e, end in enumerate(offsets_E.tolist()):
                if end > start:
                    w_in, w_out, b_in, b_out = self.expert(e)
                    y_ND[start:end] = expert_ffn(x_ND[start:end], w_in, w_out, self.act, b_in_X=b_in, b_out_D=b_out,
                                                 hidden_dropout=self.hidden_dropout if self.training else 0.0)
                start = end
            return y_ND
        if not self.layout.bias:
            expert_N = None
        elif expert_N is None:
            # The expert of each row, from the end offsets: one searchsorted (no host read; ~4x cheaper on CPU
            # than repeat_interleave of the counts); expert_ffn adds each row its expert's bias.
            N = x_ND.shape[0]
            expert_N = torch.searchsorted(offsets_E, torch.arange(N, device=x_ND.device, dtype=offsets_E.dtype),
                                          right=True)
        return expert_ffn(x_ND, self.w_in, self.w_out, self.act,
                          linear=lambda h, w_EOI: grouped_linear(h, w_EOI, offsets_E), b_in_X=self.in_proj_bias,
                          b_out_D=self.down_proj_bias, expert_N=expert_N,
                          hidden_dropout=self.hidden_dropout if self.training else 0.0)

    def _view(self, w: torch.Tensor, transposed: bool) -> torch.Tensor:
        """Stack `w` as (E, out, in) for x @ W^T: a view (flat: reshaped; transposed: swapped dims)."""
        if self.layout.flat:
            w = w.view(self.num_experts, -1, w.shape[-1])
        elif w.shape[0] > self.num_experts:  # spare rows (ExpertLayout.spare): a view of the first E
            w = w[: self.num_experts]
        return w.transpose(-2, -1) if transposed else w

    @property
    def w_in(self) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The input projection as (E, X, D) views: gate_up_proj (gated), up_proj (non-gated), or the
        pair (gate_proj, up_proj), each (E, F, D), for separate stacks."""
        self._stacked("w_in")
        t = self.layout.in_transposed
        if self.layout.split:
            return (self._view(self.gate_proj, t), self._view(self.up_proj, t))
        return self._view(self.gate_up_proj if self.act.gated else self.up_proj, t)

    @property
    def w_out(self) -> torch.Tensor:
        """The output projection as an (E, D, F) view."""
        self._stacked("w_out")
        return self._view(self.down_proj, self.layout.flat or self.layout.out_transposed)

    def expert_stacks(self) -> dict[str, torch.Tensor]:
        """Every stored per-expert tensor by attribute name, as a view with one expert per row of dim 0
        ((E, ...); flat stacks reshaped), so renumbering or removing experts reaches all of them.
        Raises ValueError for separate expert modules (listed) and stacks with spare rows, read in place."""
        self._stacked("expert_stacks")
        if self.layout.spare:
            raise ValueError(f"ExpertBank.expert_stacks: the experts are a model's own storage read in place "
                             f"({self.layout.describe()}); their rows are not one per expert")
        names = ("gate_up_proj", "gate_proj", "up_proj", "down_proj", "in_proj_bias", "down_proj_bias")
        stacks = {name: getattr(self, name) for name in names if getattr(self, name) is not None}
        if self.layout.flat:
            stacks = {name: w.view(self.num_experts, -1, *w.shape[1:]) if w.dim() == 2 and name.endswith("proj")
                      else w for name, w in stacks.items()}
        return stacks
    def require_standard(self, what: str) -> None:
        """Raise ValueError unless the bank holds moekit's own (E, ., .) stacks (ExpertLayout STANDARD):
        `what` rewrites or shards the stacks by expert row, which a model's storage read in place (a
        wrapped transformers block: transposed, flat, spare rows, separate modules) does not allow."""
        if self.layout != STANDARD:
            raise ValueError(f"{what}: the experts are a model's own storage read in place ({self.layout.describe()}); "
                             "it rewrites standard (E, ., .) stacks only")

    def _stacked(self, what: str) -> None:
        if self.layout.listed:
            raise ValueError(f"ExpertBank.{what}: this bank's experts are separate modules (ExpertLayout(listed=True)), "
                             "not stacks; read them one by one with expert(e)")

    def expert(self, e: int):
        """Expert e's (w_in (X, D) or (W_gate, W_up), w_out (D, F), b_in (X,) or None, b_out (D,) or None),
        for the reference loop."""
        if self.layout.listed:
            w_in, w_out = self.in_proj[e], self.out_proj[e]
            return w_in.weight, w_out.weight, w_in.bias, w_out.bias
        w_in = self.w_in
        w_in = tuple(w[e] for w in w_in) if isinstance(w_in, tuple) else w_in[e]
        bias = self.layout.bias
        return w_in, self.w_out[e], self.in_proj_bias[e] if bias else None, self.down_proj_bias[e] if bias else None

    def extra_repr(self) -> str:
        layout = "" if self.layout == STANDARD else f", layout=({self.layout.describe()})"
        return (f"num_experts={self.num_experts}, d_model={self.d_model}, d_expert={self.d_expert}, "
                f"{self.act.describe()}{layout}")


class SharedExpert(nn.Module):
    """A dense FFN every token uses (DeepSeekMoE / Qwen2-MoE). Names follow transformers' MLPs; a
    model's fused `gate_up_proj` Linear may stand in for gate_proj and up_proj (moekit.hf)."""

    def __init__(self, d_model: int, width: int, activation: str | Activation = "swiglu"):
        super().__init__()
        self.act = activation if isinstance(activation, Activation) else Activation(activation)
        self.activation = self.act.name
        self.gate_proj = nn.Linear(d_model, width, bias=False) if self.act.gated else None
        self.up_proj = nn.Linear(d_model, width, bias=False)
        self.down_proj = nn.Linear(width, d_model, bias=False)
        # A model's fused [gate; up] Linear (MiniMax-M3-VL), bound in place of gate_proj and up_proj.
        self.gate_up_proj: nn.Linear | None = None

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            return self.down_proj(self.act(self.gate_up_proj(x_TD)))
        if self.gate_proj is not None:
            return self.down_proj(self.act.glu(self.gate_proj(x_TD), self.up_proj(x_TD)))
        return self.down_proj(self.act(self.up_proj(x_TD)))
