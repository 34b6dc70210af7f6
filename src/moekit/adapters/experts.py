"""LoRA on fused MoE experts: the stacked expert weights of a moekit `ExpertBank` (moekit MoE layers, and
transformers MoE blocks wrapped by `moekit.hf.wrap`, whose banks hold the block's own Parameters).

Legend: N assignments (the routed rows, grouped by expert), E experts, I in width, O out width, r LoRA rank,
D model dim, F expert hidden dim, X the input projection's width (2F for SwiGLU, F for GELU).

`ExpertLoRA` takes the bank's place in its MoE layer (`layer.experts`); the bank is kept as `base_layer`.
For each targeted stacked weight W (E, O, I) (gate_up_proj (E, 2F, D), up_proj (E, F, D), down_proj (E, D, F)),
with s = lora_alpha / r (arXiv 2106.09685):

  per_expert   y_NO = grouped(x_NI, W) + s * grouped(grouped(x_NI, A), B)   A (E, r, I), B (E, O, r)
  shared       y_NO = grouped(x_NI, W) + s * (x_NI A^T) B^T                 A (r, I),    B (O, r), one pair
                                                                             for every expert

Only the N routed rows reach the adapters (the layer's dispatch gives the bank nothing else), through
the same grouped GEMM as the base weights (`moekit.ops.grouped.grouped_linear`), so any router works,
dynamic k (top-p) and null experts included. The plain per-expert formula is
`moekit.adapters.reference.expert_lora_reference` (the test oracle). Merging adds s * B_e A_e to W_e
(per expert) or s * B A to every W_e (shared); the original weights are kept while merged, so
`unmerge` is exact.

Saved layout (`adapter_state`): per-expert adapters use PEFT's `lora.ParamWrapper` layout for 3-D
parameters targeted with `target_parameters` (read from PEFT's source; untested against PEFT, which
is not a dependency):
  lora_A.weight (E * r, I)   row e * r + j = A[e, j]
  lora_B.weight (O, r * E)   column j * E + e = B[e, :, j]
one wrapper per targeted parameter, nested in the bank's parameter order (the first parameter
innermost): with gate_up_proj and down_proj both targeted, down_proj's tensors are `lora_A.weight`,
`lora_B.weight` and gate_up_proj's `base_layer.lora_A.weight`, `base_layer.lora_B.weight`. A shared
adapter (which PEFT cannot express) uses the same keys with A (r, I) and B (O, r).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moekit.adapters.config import LoRAConfig
from moekit.adapters.layer import init_expert_A
from moekit.errors import UsageError
from moekit.experts import ExpertBank
from moekit.ops.ffn import hidden
from moekit.ops.grouped import grouped_linear

# An ExpertBank's stacked weights in the order it registers them (PEFT nests its wrappers in this order).
BANK_PARAMS = ("gate_up_proj", "up_proj", "down_proj")


class ExpertLoRA(nn.Module):
    """LoRA on the stacked weights `params` of `base_layer` (an ExpertBank), per expert or shared by all
    experts (`cfg.expert_adapter`); in place of the bank, with the bank's `forward(x_ND, offsets_E)`.

    lora_A[name] (E, r, I) / (r, I): Kaiming uniform (a = sqrt(5)) as a fresh nn.Linear(I, r), per
    expert; lora_B[name] (E, O, r) / (O, r): zeros, so a new adapter leaves the bank's output unchanged.
    Adapter tensors are fp32 (whatever the bank's dtype); the update is cast to the base output's dtype.
    The bank's stacked weights and sizes read through (`gate_up_proj`, `num_experts`, ...).
    """

    def __init__(self, base_layer: ExpertBank, cfg: LoRAConfig, params: list[str], index: int = 0):
        super().__init__()
        if not isinstance(base_layer, ExpertBank):
            raise TypeError(f"ExpertLoRA wraps a moekit ExpertBank, got {type(base_layer).__name__}")
        unknown = [p for p in params if p not in BANK_PARAMS or getattr(base_layer, p) is None]
        if unknown or not params:
            raise UsageError(f"ExpertLoRA: {unknown or params} are not stacked weights of this {base_layer.activation} "
                             f"bank; allowed: {[p for p in BANK_PARAMS if getattr(base_layer, p) is not None]}")
        self.base_layer = base_layer
        self.cfg = cfg
        self.index = index
        self.scaling = cfg.scaling
        self.per_expert = cfg.expert_adapter == "per_expert"
        self.targets = tuple(p for p in BANK_PARAMS if p in params)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        for name in self.targets:
            W_EOI = getattr(base_layer, name)
            E, O, I = W_EOI.shape
            lead = (E,) if self.per_expert else ()
            A = nn.Parameter(torch.empty(*lead, cfg.r, I, device=W_EOI.device))
            if self.per_expert:
                init_expert_A(A)
            else:
                nn.init.kaiming_uniform_(A, a=math.sqrt(5))
            self.lora_A[name] = A
            self.lora_B[name] = nn.Parameter(torch.zeros(*lead, O, cfg.r, device=W_EOI.device))
        self.merged = False
        self.disabled = False
        self._original: dict[str, torch.Tensor] = {}

    # The bank's stacked weights and sizes, read through (code that reads `layer.experts.down_proj` works).
    gate_up_proj = property(lambda self: self.base_layer.gate_up_proj)
    up_proj = property(lambda self: self.base_layer.up_proj)
    down_proj = property(lambda self: self.base_layer.down_proj)
    w_in = property(lambda self: self.base_layer.w_in)
    num_experts = property(lambda self: self.base_layer.num_experts)
    d_model = property(lambda self: self.base_layer.d_model)
    d_expert = property(lambda self: self.base_layer.d_expert)
    activation = property(lambda self: self.base_layer.activation)

    def forward(self, x_ND: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
        """Rows sorted by expert, offsets_E (E,) int32 end offsets (as ExpertBank.forward)."""
        bank = self.base_layer
        if self.disabled or self.merged:
            return bank(x_ND, offsets_E)
        w_in = "gate_up_proj" if bank.activation == "swiglu" else "up_proj"
        h_NX = self._linear(w_in, x_ND, offsets_E)
        return self._linear("down_proj", hidden(h_NX, bank.activation), offsets_E)

    def _linear(self, name: str, x_NI: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
        y_NO = grouped_linear(x_NI, getattr(self.base_layer, name), offsets_E)
        if name not in self.lora_A:
            return y_NO
        A, B = self.lora_A[name], self.lora_B[name]
        x_NI = x_NI.to(A.dtype)
        if self.per_expert:
            delta_NO = grouped_linear(grouped_linear(x_NI, A, offsets_E), B, offsets_E)
        else:
            delta_NO = F.linear(F.linear(x_NI, A), B)
        return y_NO + (delta_NO * self.scaling).to(y_NO.dtype)

    # ------------------------------------------------------------------ the adapter-layer interface
    def aux_loss(self) -> torch.Tensor | None:
        return None

    def after_optimizer_step(self) -> None:
        """No routing state of its own (the MoE layer's router is frozen with the base model)."""

    def base_weights(self) -> list[torch.Tensor]:
        """The bank tensors `merge` changes."""
        return [getattr(self.base_layer, name) for name in self.targets]

    def delta_weight(self, name: str | None = None) -> torch.Tensor:
        """s * B_e A_e for every expert, (E, O, I), of the targeted weight `name` (default: the first)."""
        name = name or self.targets[0]
        A, B = self.lora_A[name], self.lora_B[name]
        delta = B @ A * self.scaling  # (E, O, r) @ (E, r, I), or (O, r) @ (r, I) for one shared pair
        return delta if self.per_expert else delta.expand(self.num_experts, *delta.shape)

    @torch.no_grad()
    def merge(self) -> None:
        """W_e += s * B_e A_e (computed in fp32, rounded once to W's dtype); the original weights are kept
        so that `unmerge` restores them bit for bit."""
        if self.merged:
            raise UsageError("merge: this adapter is already merged")
        for name in self.targets:
            W = getattr(self.base_layer, name)
            delta = self.delta_weight(name).float().to(W.device)
            self._original[name] = W.detach().clone()
            W.copy_((W.float() + delta).to(W.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            raise UsageError("unmerge: this adapter is not merged")
        for name in self.targets:
            getattr(self.base_layer, name).copy_(self._original.pop(name))
        self.merged = False

    def unload(self) -> ExpertBank:
        """The bank, without the copy of its original weights that a merge keeps (merge_and_unload)."""
        self._original.clear()
        return self.base_layer

    def _keys(self) -> dict[str, str]:
        """Saved key prefix of each target: PEFT's nesting, the bank's first parameter innermost."""
        last = len(self.targets) - 1
        return {name: "base_layer." * (last - i) for i, name in enumerate(self.targets)}

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """The adapter tensors in the saved layout (see the module doc)."""
        state = {}
        for name, prefix in self._keys().items():
            A, B = self.lora_A[name].detach(), self.lora_B[name].detach()
            if self.per_expert:
                E, r, I = A.shape
                A, B = A.reshape(E * r, I), B.permute(1, 2, 0).reshape(B.shape[1], r * E)
            state[f"{prefix}lora_A.weight"], state[f"{prefix}lora_B.weight"] = A, B
        return state

    @torch.no_grad()
    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        """Copy tensors of `adapter_state`'s keys and shapes into the adapters."""
        for name, prefix in self._keys().items():
            A, B = self.lora_A[name], self.lora_B[name]
            a, b = state[f"{prefix}lora_A.weight"], state[f"{prefix}lora_B.weight"]
            if self.per_expert:
                E, r, I = A.shape
                a, b = a.reshape(E, r, I), b.reshape(B.shape[1], r, E).permute(2, 0, 1)
            A.copy_(a.to(A.dtype))
            B.copy_(b.to(B.dtype))

    def extra_repr(self) -> str:
        mode = "per-expert" if self.per_expert else "shared"
        return f"{self.cfg.describe()}, {mode}, targets={list(self.targets)}, num_experts={self.num_experts}"
