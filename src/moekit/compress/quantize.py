"""Weight-only, group-wise quantisation of routed experts, per expert, computed through the grouped path.

Legend: N assignments (rows grouped by expert), D model dim, F expert hidden dim, X = 2F (SwiGLU)
or F (GELU), E experts, A experts with rows (active), R rows and C columns of one weight matrix,
G quantisation groups per row.

Format of one weight matrix w (R, C) at b bits (b in 2, 4, 8), groups of `group_size` columns:
    scale_RG = max |w| over the group / qmax,  qmax = 2^(b-1) - 1       (symmetric, fp32 scales)
    q = clamp(round(w / scale), -qmax, qmax)                             stored as q + 2^(b-1), b bits,
    w_hat = q * scale                                                    8 / b codes per byte
Round to nearest, so |w - w_hat| <= scale / 2 = max|w_group| / (2 qmax): the analytic bound the
tests check. Bytes per weight: b / 8 + 4 / group_size.

`QuantizedExpertBank` replaces a layer's `ExpertBank` (the swap point of the design): each forward
dequantises only the experts that received rows (A of E), stacks them and runs the same grouped
GEMMs (`moekit.ops.grouped.grouped_linear`) over those A experts. Each expert has its own bit width,
so a layer can mix int8 and int4 experts.

Mixed precision (MC-MoE, arXiv 2410.06270: bits per expert from how much the expert is used): the
importance of an expert is its routing frequency times its mean combine weight (from a
`Calibration`); starting from the lowest width, the upgrade with the largest importance-weighted
error reduction per extra bit (error of b bits ~ 2^(-2b)) is taken while the mean code bits stay
within the target -- a greedy form of the paper's integer program over the same objective.

Super experts (arXiv 2507.23279): the experts whose largest |output| on the calibration text is at
or above the 99.5th percentile of all experts and above a tenth of the maximum, within the first
75% of the MoE layers. They are kept at 8 bits whatever the method, and reported.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import torch
from torch import nn

from moekit.compress.calibrate import Calibration
from moekit.errors import UsageError
from moekit.experts.bank import STANDARD
from moekit.layers.moe import MoELayer, moe_layers
from moekit.ops.ffn import Activation, expert_ffn
from moekit.ops.grouped import grouped_linear

__all__ = ["BITS", "QuantizeResult", "QuantizedExpertBank", "dequantize", "expert_bytes", "mixed_bits", "parse_method",
           "quantize", "quantize_tensor", "super_experts"]

BITS = (2, 4, 8)
PROTECTED_BITS = 8


def _qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def quantize_tensor(w_RC: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed codes uint8 (R, C * bits / 8), scales fp32 (R, C / group_size)) of `w_RC` (module doc).
    Raises UsageError when `bits` is not 2, 4 or 8 or `group_size` does not divide C."""
    if bits not in BITS:
        raise UsageError(f"quantisation to {bits} bits is not supported; allowed: {', '.join(map(str, BITS))}")
    R, C = w_RC.shape
    if group_size < 1 or C % group_size:
        raise UsageError(f"--group-size {group_size} is invalid for a weight of {C} columns; allowed: a divisor of {C}")
    w_RGS = w_RC.detach().float().reshape(R, C // group_size, group_size)
    scale_RG = w_RGS.abs().amax(-1) / _qmax(bits)
    scale_RG = torch.where(scale_RG > 0, scale_RG, torch.ones_like(scale_RG))
    q_RGS = torch.round(w_RGS / scale_RG[..., None]).clamp(-_qmax(bits), _qmax(bits))
    codes_RC = (q_RGS.reshape(R, C) + 2 ** (bits - 1)).to(torch.uint8)
    per = 8 // bits
    codes_RBP = codes_RC.reshape(R, C // per, per)
    packed_RB = torch.zeros(R, C // per, dtype=torch.uint8)
    for j in range(per):
        packed_RB |= codes_RBP[..., j] << (bits * j)
    return packed_RB, scale_RG


def dequantize(packed_RB: torch.Tensor, scale_RG: torch.Tensor, bits: int, dtype=torch.float32) -> torch.Tensor:
    """The weight (R, C) that `quantize_tensor` encoded, in `dtype`."""
    per = 8 // bits
    R, B = packed_RB.shape
    mask = (1 << bits) - 1
    codes_RBP = torch.stack([(packed_RB >> (bits * j)) & mask for j in range(per)], dim=-1)
    q_RC = codes_RBP.reshape(R, B * per).to(torch.int16) - 2 ** (bits - 1)
    G = scale_RG.shape[1]
    w_RGS = q_RC.reshape(R, G, -1).to(torch.float32) * scale_RG[..., None]
    return w_RGS.reshape(R, B * per).to(dtype)


class QuantizedExpertBank(nn.Module):
    """Routed experts stored as group-wise int codes, one bit width per expert (module doc).

    Same call as `ExpertBank`: forward(x_ND, offsets_E) with rows grouped by expert. Buffers (saved with
    the model): `w_in_q{e}` uint8 and `w_in_s{e}` fp32 (the input projection (X, D)), `down_q{e}` and
    `down_s{e}` (the output projection (D, F)) for each expert e. `last_active` holds how many experts
    the last forward dequantised. Inference only: the codes take no gradient.
    """

    def __init__(self, num_experts: int, d_model: int, d_expert: int, activation: str, bits_E: list[int],
                 group_size: int):
        super().__init__()
        if len(bits_E) != num_experts:
            raise ValueError(f"QuantizedExpertBank: {len(bits_E)} bit widths for {num_experts} experts")
        self.num_experts, self.d_model, self.d_expert, self.activation = num_experts, d_model, d_expert, activation
        self.bits_E, self.group_size = list(bits_E), group_size
        X = 2 * d_expert if Activation(activation).gated else d_expert
        for c in (d_model, d_expert):
            if c % group_size:
                raise UsageError(f"--group-size {group_size} is invalid: it must divide d_model={d_model} and "
                                 f"d_expert={d_expert}")
        for e, b in enumerate(self.bits_E):
            if b not in BITS:
                raise UsageError(f"expert {e}: {b} bits is not supported; allowed: {', '.join(map(str, BITS))}")
            self.register_buffer(f"w_in_q{e}", torch.zeros(X, d_model * b // 8, dtype=torch.uint8))
            self.register_buffer(f"w_in_s{e}", torch.ones(X, d_model // group_size))
            self.register_buffer(f"down_q{e}", torch.zeros(d_model, d_expert * b // 8, dtype=torch.uint8))
            self.register_buffer(f"down_s{e}", torch.ones(d_model, d_expert // group_size))
        self.last_active = 0

    @classmethod
    @torch.no_grad()
    def from_bank(cls, bank: nn.Module, bits_E: list[int], group_size: int) -> QuantizedExpertBank:
        """Quantise an `ExpertBank`'s experts (expert e at bits_E[e]). Raises UsageError for a bank this
        quantiser does not express (another layout than the standard stacks, expert biases, a clamped
        activation, e.g. a wrapped gpt-oss block)."""
        check_quantizable(bank)
        new = cls(bank.num_experts, bank.d_model, bank.d_expert, bank.activation, bits_E, group_size)
        for e, b in enumerate(bits_E):
            for name, w in (("w_in", bank.w_in[e]), ("down", bank.down_proj[e])):
                q, s = quantize_tensor(w, b, group_size)
                getattr(new, f"{name}_q{e}").copy_(q)
                getattr(new, f"{name}_s{e}").copy_(s)
        return new.to(bank.down_proj.device)

    def expert_weights(self, e: int, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert e's dequantised (w_in (X, D), w_down (D, F))."""
        b = self.bits_E[e]
        return (dequantize(getattr(self, f"w_in_q{e}"), getattr(self, f"w_in_s{e}"), b, dtype),
                dequantize(getattr(self, f"down_q{e}"), getattr(self, f"down_s{e}"), b, dtype))

    def expert_nbytes(self, e: int) -> int:
        """Bytes expert e takes (codes and scales)."""
        return sum(getattr(self, f"{n}{e}").nbytes for n in ("w_in_q", "w_in_s", "down_q", "down_s"))

    def forward(self, x_ND: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
        """Each row through its expert: the active experts' weights are dequantised into (A, ., .) stacks and
        the grouped GEMMs run over them (offsets restricted to the active experts)."""
        counts_E = torch.diff(offsets_E, prepend=offsets_E.new_zeros(1))
        active_A = counts_E.nonzero().squeeze(1).tolist()  # NOTE: one host sync per layer (CPU inference)
        self.last_active = len(active_A)
        if not active_A:
            return x_ND.new_zeros(x_ND.shape[0], self.d_model)
        pairs = [self.expert_weights(e, x_ND.dtype) for e in active_A]
        w_in_AXD = torch.stack([p[0] for p in pairs])
        down_ADF = torch.stack([p[1] for p in pairs])
        offsets_A = offsets_E[active_A]
        return expert_ffn(x_ND, w_in_AXD, down_ADF, self.activation,
                          linear=lambda h, w: grouped_linear(h, w, offsets_A))

    def extra_repr(self) -> str:
        widths = ", ".join(f"int{b} x{self.bits_E.count(b)}" for b in sorted(set(self.bits_E)))
        return (f"num_experts={self.num_experts}, d_model={self.d_model}, d_expert={self.d_expert}, "
                f"{self.activation}, {widths}, group_size={self.group_size}")


def super_experts(calib: Calibration, percentile: float = 99.5, share: float = 0.1,
                  depth: float = 0.75) -> list[tuple[int, int]]:
    """(layer, expert) of the super experts (arXiv 2507.23279, module doc), from `max_abs_E`."""
    values = torch.cat([s.max_abs_E for s in calib.layers])
    if values.numel() == 0 or float(values.max()) <= 0:
        return []
    threshold = max(float(torch.quantile(values, percentile / 100)), share * float(values.max()))
    limit = math.ceil(depth * len(calib.layers))
    return [(i, e) for i, s in enumerate(calib.layers[:limit]) for e in range(s.num_experts)
            if float(s.max_abs_E[e]) >= threshold]


def mixed_bits(calib: Calibration, target_bits: float, protected: set[tuple[int, int]] = frozenset()) -> list[list[int]]:
    """Bits per expert (from BITS) with mean code bits <= target_bits (MC-MoE, module doc); protected experts
    get PROTECTED_BITS. Every expert has the same number of weights, so bits average over experts."""
    lo, hi = min(BITS), max(BITS)
    if not lo <= target_bits <= hi:
        raise UsageError(f"--quantize mixed:{target_bits} is invalid; allowed: mean bits in [{lo}, {hi}]")
    bits = [[PROTECTED_BITS if (i, e) in protected else lo for e in range(s.num_experts)]
            for i, s in enumerate(calib.layers)]
    n = sum(map(len, bits))
    budget = target_bits * n - sum(map(sum, bits))
    importance = [(s.frequency_E() * s.mean_gate_E()).tolist() for s in calib.layers]

    def gain(i: int, e: int) -> tuple[float, int] | None:
        b = bits[i][e]
        up = next((c for c in BITS if c > b), None)
        if up is None:
            return None
        return importance[i][e] * (4.0 ** -b - 4.0 ** -up) / (up - b), up

    heap = []
    for i, row in enumerate(bits):
        for e in range(len(row)):
            g = gain(i, e)
            if g is not None:
                heapq.heappush(heap, (-g[0], i, e, g[1]))
    while heap:
        _, i, e, up = heapq.heappop(heap)
        cost = up - bits[i][e]
        if cost > budget + 1e-9:
            continue
        bits[i][e], budget = up, budget - cost
        g = gain(i, e)
        if g is not None:
            heapq.heappush(heap, (-g[0], i, e, g[1]))
    return bits


def parse_method(text: str) -> tuple[str, float]:
    """'int8' | 'int4' | 'int2' | 'mixed:BITS' -> (kind, bits). Raises UsageError naming the choices."""
    allowed = "int8, int4, int2 or mixed:BITS (mean bits per weight, e.g. mixed:3.5)"
    if text in ("int8", "int4", "int2"):
        return "uniform", float(text[3:])
    if text.startswith("mixed:"):
        try:
            return "mixed", float(text.split(":", 1)[1])
        except ValueError:
            pass
    raise UsageError(f"--quantize {text!r} is invalid; allowed: {allowed}")


@dataclass
class QuantizeResult:
    bits: list[list[int]]
    group_size: int
    method: str
    protected: list[tuple[int, int]]
    bytes_before: int
    bytes_after: int

    def summary(self) -> str:
        counts: dict[int, int] = {}
        for row in self.bits:
            for b in row:
                counts[b] = counts.get(b, 0) + 1
        parts = ", ".join(f"int{b} on {counts[b]} experts" for b in sorted(counts, reverse=True))
        sup = f"; {len(self.protected)} super experts kept at int{PROTECTED_BITS}: {self.protected}" if self.protected else ""
        mean = sum(map(sum, self.bits)) / max(sum(map(len, self.bits)), 1)
        return (f"quantised ({self.method}, groups of {self.group_size}): {parts}; mean {mean:.2f} code bits; "
                f"expert bytes {self.bytes_before:,} -> {self.bytes_after:,} "
                f"({self.bytes_after / max(self.bytes_before, 1):.1%}){sup}")

    def to_dict(self) -> dict:
        return {"method": "quantize", "kind": self.method, "group_size": self.group_size, "bits": self.bits,
                "protected": [list(p) for p in self.protected]}


def check_quantizable(bank: nn.Module) -> None:
    """UsageError unless `bank` holds standard stacks with an activation without parameters (what the quantiser
    rewrites; a bank quantised already is refused by `install`)."""
    if isinstance(bank, QuantizedExpertBank):
        return
    if bank.layout != STANDARD or bank.act != Activation(bank.activation):
        raise UsageError(f"quantize: the expert bank ({bank.extra_repr()}) is not the standard SwiGLU stack this "
                         "quantiser handles; expected the standard layout and an activation without parameters")


def install(layer: MoELayer, bits_E: list[int], group_size: int) -> QuantizedExpertBank:
    """Replace `layer`'s ExpertBank with its quantised form (bits_E per bank expert)."""
    if isinstance(layer.experts, QuantizedExpertBank):
        raise UsageError("quantize: this model's experts are quantised already")
    layer.experts = QuantizedExpertBank.from_bank(layer.experts, bits_E, group_size)
    return layer.experts


def _bank_nbytes(bank: nn.Module) -> int:
    if isinstance(bank, QuantizedExpertBank):
        return sum(bank.expert_nbytes(e) for e in range(bank.num_experts))
    w_in = bank.w_in if isinstance(bank.w_in, tuple) else (bank.w_in,)  # split gate / up stacks (DBRX): a pair
    return sum(w.nbytes for w in (*w_in, bank.down_proj))


def expert_bytes(model: nn.Module) -> int:
    """Bytes of every routed expert of `model` as it holds them (quantised: codes and scales; merged: the
    merged experts once)."""
    return sum(_bank_nbytes(m.experts) for m in moe_layers(model))


def quantize(model: nn.Module, method: str, calib: Calibration | None = None, group_size: int = 64,
             protect_super: bool = True) -> QuantizeResult:
    """Quantise every MoE layer's routed experts of `model` in place.

    method: 'int8' | 'int4' | 'int2' | 'mixed:BITS' (`parse_method`). A calibration is needed for mixed
    precision and for super-expert protection (without one nothing is protected). Merged layers
    (`expert_map_E`) quantise their bank's experts, each at the widest width of the router experts
    mapped to it. Returns what was done.
    """
    kind, value = parse_method(method)
    layers = moe_layers(model)
    protected = super_experts(calib) if (calib is not None and protect_super) else []
    if kind == "mixed":
        if calib is None:
            raise UsageError("--quantize mixed needs calibration (--calib): bits follow each expert's use")
        bits = mixed_bits(calib, value, set(protected))
    else:
        bits = [[PROTECTED_BITS if (i, e) in protected else int(value) for e in range(m.router.num_experts)]
                for i, m in enumerate(layers)]
    before = sum(_bank_nbytes(m.experts) for m in layers)
    bank_bits = []
    for layer, row in zip(layers, bits, strict=True):
        if layer.expert_map_E is None:
            per_bank = row
        else:
            per_bank = [0] * layer.experts.num_experts
            for e, p in enumerate(layer.expert_map_E.tolist()):
                per_bank[p] = max(per_bank[p], row[e])
        install(layer, per_bank, group_size)
        bank_bits.append(per_bank)
    after = sum(_bank_nbytes(m.experts) for m in layers)
    return QuantizeResult(bank_bits, group_size, method, protected, before, after)
