"""Run a model's MoE layers with only cached experts resident: `offload(model, store, budget, policy)`.

Legend: T tokens, D model dim, E experts, F expert hidden dim, N assignments (rows grouped by
expert), A active experts of a forward (counts_E > 0), K experts per token.

Every MoELayer keeps its router, dispatch and combine; its `experts` module (an ExpertBank with
stacked weights) is replaced by `OffloadedExperts`, which has the same `forward(x_ND, offsets_E)`:
  1. active experts = those with rows (counts_E > 0), ascending;
  2. split into steps of at most `plan.step_size` experts (one step for a decode token);
  3. per step: `cache.acquire` (hits, demand loads), then - first step of a decode forward with
     the predictive policy - predict the next MoE layer's experts (its router applied to this
     layer's input: moekit.routers.predict, the rule analysis uses too) and `cache.prefetch` them
     in the background while this layer computes;
  4. the same per-expert GEMMs as the resident grouped path (`moekit.ops.grouped`): torch.mm per
     expert in the dtype `grouped_linear` would pick, so outputs equal the resident layer's
     bit for bit (tested), then `cache.end_step`.
Nothing of size T x E x D is built. Inference only (no autograd through the loaded experts).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from moekit.compress.quantize import QuantizedExpertBank, dequantize
from moekit.errors import UsageError
from moekit.experts import ExpertBank
from moekit.layers.moe import MoELayer, moe_layers
from moekit.offload.budget import CachePlan, ExpertShape, hot_keys_from_counts, plan_cache
from moekit.offload.cache import ExpertCache
from moekit.offload.store import ExpertStore, _expert_tensors, bank_format
from moekit.ops.grouped import (
    compute_dtype,
    forward_runs_loop_numpy,
    forward_runs_loop_wx,
    mm_rows_numpy,
    mm_rows_wx,
    note_ran,
)
from moekit.routers.predict import can_predict, predict_experts, priority_order

__all__ = ["OffloadRuntime", "OffloadedExperts", "expert_shape", "hot_counts", "offload", "plan_offload",
           "token_experts"]


def token_experts(layer: MoELayer) -> int:
    """K: experts one token needs resident at once at this layer, the least a cache must hold: the
    router's own answer (`RouterConfig.min_resident_experts`; top-k: k; top-p: its cap max_k, else
    min_k, and a token whose experts do not fit runs in several cache steps; other dynamic routers:
    the expected count, rounded up). Zero-computation experts (MoE++) need no weights: such a layer
    needs its expected FFN experts per token and iteration, rounded up (a token that picks more runs
    in several cache steps)."""
    cfg = layer.cfg
    K = cfg.router.min_resident_experts(cfg.router_slots)
    if cfg.num_zero_compute:
        K = min(K, max(1, math.ceil(cfg.expected_experts_per_token() / cfg.iterations)))
    return K


def hot_counts(source, num_layers: int, num_experts: int):
    """Per-(layer, expert) use counts (L, E) from a RoutingTrace, a trace file path or an array."""
    import numpy as np

    from moekit.analysis.routing_trace import RoutingTrace
    from moekit.analysis.tracefile import load_trace

    if isinstance(source, str) or hasattr(source, "__fspath__"):
        source = load_trace(source)
    if isinstance(source, RoutingTrace):
        if source.num_layers != num_layers or source.num_experts != num_experts:
            raise ValueError(f"hot-set trace has L={source.num_layers}, E={source.num_experts}; the model has "
                             f"L={num_layers}, E={num_experts}")
        counts = np.zeros((num_layers, num_experts), dtype=np.int64)
        for s in source.seqs:
            for layer in range(num_layers):
                ids = s[layer][s[layer] >= 0]
                counts[layer] += np.bincount(ids, minlength=num_experts)
        return counts
    counts = np.asarray(source)
    if counts.shape != (num_layers, num_experts):
        raise ValueError(f"hot-set counts must have shape (L, E) = ({num_layers}, {num_experts}), got {counts.shape}")
    return counts


class OffloadedExperts(nn.Module):
    """Stand-in for a MoE layer's ExpertBank that fetches expert weights from an ExpertCache."""

    def __init__(self, layer_idx: int, runtime: OffloadRuntime, bank: nn.Module):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_experts, self.d_model, self.d_expert = bank.num_experts, bank.d_model, bank.d_expert
        self.activation = bank.activation
        object.__setattr__(self, "_runtime", runtime)  # not a submodule: no cycle in modules()

    def forward(self, x_ND: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
        return self._runtime.run_experts(self.layer_idx, x_ND, offsets_E)

    def extra_repr(self) -> str:
        return (f"layer={self.layer_idx}, num_experts={self.num_experts}, d_model={self.d_model}, "
                f"d_expert={self.d_expert}, {self.activation}, weights from {self._runtime.store.path}")


def _linear_rows(x_NI: torch.Tensor, w_by_expert: list[torch.Tensor], ranges: list[tuple[int, int]],
                 upcast: torch.dtype | None, out_NO: torch.Tensor, num_experts: int) -> None:
    """out_NO[s:t] = x_NI[s:t] @ w.T for each expert's row range (s, t), as `_loop_mm` and the CPU
    grouped kernel compute them (bitwise equal, checked in tests), or as "loop_wx" (`mm_rows_wx`) or
    "loop_numpy" (`mm_rows_numpy`) where the resident forward of these rows over `num_experts` experts runs
    that: every range at the same rows of full-size buffers as in the resident forward, because MKL's rounding
    can depend on where an output starts (seen with rows of 37 floats); `upcast` mirrors grouped_linear's fp32
    compute of low-precision inputs on CPUs without bf16 instructions (convert, GEMM, round once)."""
    if upcast is None and forward_runs_loop_wx(x_NI, w_by_expert[0].t(), x_NI.shape[0], num_experts):
        note_ran("forward", "loop_wx")
        for w_OI, (s, t) in zip(w_by_expert, ranges, strict=True):
            mm_rows_wx(x_NI, w_OI, s, t, out_NO)
        return
    if upcast is None and forward_runs_loop_numpy(x_NI, w_by_expert[0].t(), x_NI.shape[0], num_experts):
        note_ran("forward", "loop_numpy")
        mm_rows_numpy(x_NI, [w_OI.t().detach().numpy() for w_OI in w_by_expert], ranges, out_NO)
        return
    note_ran("forward", "loop")  # one mm per expert: the kernel's numbers too (bitwise, tested)
    if upcast is None:
        for w_OI, (s, t) in zip(w_by_expert, ranges, strict=True):
            torch.mm(x_NI[s:t], w_OI.t(), out=out_NO[s:t])
        return
    r0, r1 = ranges[0][0], ranges[-1][1]  # a step's experts are consecutive: rows r0..r1
    x_up = x_NI.new_empty(x_NI.shape, dtype=upcast)
    out_up = out_NO.new_empty(out_NO.shape, dtype=upcast)
    x_up[r0:r1] = x_NI[r0:r1]
    for w_OI, (s, t) in zip(w_by_expert, ranges, strict=True):
        torch.mm(x_up[s:t], w_OI.to(upcast).t(), out=out_up[s:t])
    out_NO[r0:r1] = out_up[r0:r1]


class OffloadRuntime:
    """The offloaded state of one model: store, cache, replaced modules, prediction hooks.

    Use as a context manager (or call `close`): closing stops the prefetch thread and, unless the
    weights were released, puts the original ExpertBanks back.
    """

    def __init__(self, model: nn.Module, store: ExpertStore, plan: CachePlan, *, hot_keys=None,
                 release: bool = False, device: str | torch.device | None = None):
        self.model = model
        self.store = store
        self.plan = plan
        self.layers = moe_layers(model)
        store.check_matches(self.layers)
        for i, layer in enumerate(self.layers):
            if not isinstance(layer.experts, ExpertBank | QuantizedExpertBank):
                raise ValueError(f"MoE layer {i} holds {type(layer.experts).__name__}; is the model offloaded already?")
        if device is None:
            device = next((p.device for p in model.parameters() if not p.is_meta), torch.device("cpu"))
        self.cache = ExpertCache(store, plan, hot_keys=hot_keys, device=device)
        self.released = release
        self.predict = plan.policy == "predictive"
        self.phase = "prefill"
        self.forward_idx = -1
        self.predictions: list[tuple[int, int, list[int]]] = []  # (forward, target layer, experts in priority order)
        self._x_TD: dict[int, torch.Tensor] = {}
        self._hooks = []
        self.originals: list[nn.Module | None] = []
        for i, layer in enumerate(self.layers):
            bank = layer.experts
            if release:
                _release_bank(layer, bank)
                self.originals.append(None)
            else:
                self.originals.append(bank)
            layer.experts = OffloadedExperts(i, self, bank)
            if self.predict:
                self._hooks.append(layer.register_forward_pre_hook(self._capture(i), with_kwargs=True))
        self.closed = False

    def __enter__(self) -> OffloadRuntime:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the prefetch thread; put the original experts back unless they were released."""
        if self.closed:
            return
        self.closed = True
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self._x_TD.clear()
        try:
            self.cache.close()
        finally:
            for layer, bank in zip(self.layers, self.originals, strict=True):
                if bank is not None:
                    layer.experts = bank

    def begin_forward(self, phase: str) -> None:
        """Called before each model forward by the generation loop: 'prefill' or 'decode'."""
        if phase not in ("prefill", "decode"):
            raise ValueError(f"phase must be 'prefill' or 'decode', got {phase!r}")
        self.phase = phase
        self.cache.phase = phase
        self.forward_idx += 1

    def _capture(self, i: int):
        def hook(_module, args, kwargs):
            x = args[0] if args else kwargs.get("x", kwargs.get("hidden_states"))
            self._x_TD[i] = x.detach().reshape(-1, x.shape[-1])
        return hook

    def groups(self, active: list[int]) -> list[list[int]]:
        G = self.plan.step_size
        return [active[i:i + G] for i in range(0, len(active), G)]

    def run_experts(self, layer_idx: int, x_ND: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
        if self.closed:
            raise RuntimeError("this offloaded model's runtime is closed; offload it again to run it")
        if torch.is_grad_enabled() and x_ND.requires_grad:
            raise RuntimeError("offloaded experts are inference-only: run the model under torch.no_grad()")
        ends = offsets_E.tolist()
        starts = [0, *ends[:-1]]
        active = [e for e in range(len(ends)) if ends[e] > starts[e]]
        N, D = x_ND.shape
        y_ND = x_ND.new_empty(N, D)
        if not active:
            return y_ND
        # The dtype grouped_linear would compute in, decided on the whole forward as it does.
        cdt = compute_dtype(x_ND.dtype, x_ND.device)
        upcast = cdt if cdt != x_ND.dtype and N > 16 * len(active) else None
        act, lay = self.store.act, self.store.bank_layout
        # Full-size intermediates, filled step by step: each row where the resident forward has it.
        width = 2 * self.store.d_expert if act.gated else self.store.d_expert
        h_NX = x_ND.new_empty(N, width)
        # zeros: "loop_wx" may pair a lone row with a neighbour another step fills later (its column is dropped)
        h_NF = x_ND.new_zeros(N, self.store.d_expert)
        quant = self.store.quantization
        # The experts the resident GEMMs run over: a quantised bank dequantises the active ones into a stack.
        num_experts = len(active) if quant is not None else len(ends)
        for gi, group in enumerate(self.groups(active)):
            weights = self.cache.acquire(layer_idx, group)
            if quant is not None:  # compressed bytes were moved; dequantise the step's experts only, each at its width
                bits = [self.store.expert_bits(layer_idx, e) for e in group]
                weights = [(dequantize(q_in, s_in, b, x_ND.dtype), dequantize(q_down, s_down, b, x_ND.dtype))
                           for (q_in, s_in, q_down, s_down), b in zip(weights, bits, strict=True)]
            if gi == 0 and self.predict and self.phase == "decode" and len(active) <= self.plan.step_size:
                self._prefetch_next(layer_idx)
            ranges = [(starts[e], ends[e]) for e in group]
            r0, r1 = ranges[0][0], ranges[-1][1]
            # (out, in) views of the stored tensors, as ExpertBank.w_in / w_out view its stacks.
            _linear_rows(x_ND, [w[0].t() if lay.in_transposed else w[0] for w in weights], ranges, upcast, h_NX,
                         num_experts)
            if lay.bias:  # ExpertBank adds each row's expert bias before the activation and after down
                for w, (s, t) in zip(weights, ranges, strict=True):
                    h_NX[s:t] += w[2]
            h_NF[r0:r1] = act(h_NX[r0:r1])  # the expert FFN's own activation (clamps, interleaving)
            _linear_rows(h_NF, [w[1].t() if lay.out_transposed else w[1] for w in weights], ranges, upcast, y_ND,
                         num_experts)
            if lay.bias:
                for w, (s, t) in zip(weights, ranges, strict=True):
                    y_ND[s:t] += w[3]
            self.cache.end_step(layer_idx)
        return y_ND

    def _prefetch_next(self, layer_idx: int) -> None:
        nxt = layer_idx + 1
        x_TD = self._x_TD.get(layer_idx)
        if nxt >= len(self.layers) or x_TD is None:
            return
        router = self.layers[nxt].router
        if not can_predict(router):  # e.g. the recurrent router: its gate reads a state, not the token
            return
        order = priority_order(predict_experts(router, x_TD, self.layers[nxt].cfg.num_experts))
        expert_map = self.store.expert_maps[nxt]
        if expert_map is not None:  # merged: the router's experts -> the stored experts that compute them
            order = list(dict.fromkeys(expert_map[e] for e in order))
        self.predictions.append((self.forward_idx, nxt, order))
        self.cache.prefetch(nxt, order)

    def stats(self) -> dict:
        return {phase: st.as_dict() for phase, st in self.cache.stats.items()}


def _release_bank(layer: MoELayer, bank: nn.Module) -> None:
    """Free the resident expert weights: the ExpertBank's Parameters (and a wrapped transformers
    block's own references to them) become meta tensors. Irreversible."""
    if isinstance(bank, QuantizedExpertBank):  # codes and scales are buffers
        for name, b in list(bank._buffers.items()):
            bank._buffers[name] = torch.empty(b.shape, dtype=b.dtype, device="meta")
        return
    tensors = [t for t in (bank.gate_up_proj, bank.gate_proj, bank.up_proj, bank.down_proj, bank.in_proj_bias,
                           bank.down_proj_bias) if t is not None]
    ids = {id(t) for t in tensors}
    owners = [bank]
    original = getattr(layer, "original", None)
    if callable(original):  # moekit.hf.HFMoEBlock: the HF block holds the same Parameters
        owners.extend(original().modules())
    for owner in owners:
        for name, p in list(owner._parameters.items()):
            if p is not None and id(p) in ids:
                owner._parameters[name] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"),
                                                       requires_grad=False)


def offload(model: nn.Module, store: ExpertStore | str, budget: str | int | float = "25%", policy: str = "lru",
            scope: str = "layer", *, hot_set=None, release: bool = False, verify: str = "first",
            device: str | torch.device | None = None) -> OffloadRuntime:
    """Replace every MoE layer's experts of `model` by cached experts from `store`.

    budget: "25%" of all expert bytes, a size with a unit ("512MB", "1.5GiB") or a whole number of
        bytes >= 1 (1 << 30); a bare number below 1 is refused (see `moekit.offload.parse_budget`).
    policy: lru | lfu | static | predictive.  scope: "layer" (one cache per layer) | "shared".
    hot_set (static): a RoutingTrace, a trace file, or (L, E) use counts; the hot set is the most
        used experts (per layer or overall).
    release: free the model's resident expert weights (irreversible) instead of keeping them to
        put back on close.
    """
    st = store if isinstance(store, ExpertStore) else ExpertStore(store, verify=verify)
    plan, hot_keys = plan_offload(model, st, budget, policy, scope, hot_set)
    return OffloadRuntime(model, st, plan, hot_keys=hot_keys, release=release, device=device)


def _layers(model: nn.Module, what: str) -> list[MoELayer]:
    layers = moe_layers(model)
    if not layers:
        raise ValueError(f"{what}: {type(model).__name__} contains no moekit MoELayer")
    return layers


def expert_shape(model: nn.Module) -> ExpertShape:
    """The shape of the store `write_store(model, ...)` would write (L, E, bytes per expert), read from
    the model without writing anything: budgets are checked against it before a store is written."""
    layers = _layers(model, "expert_shape")
    bank = layers[0].experts
    if not isinstance(bank, ExpertBank | QuantizedExpertBank):
        raise ValueError(f"expert_shape: the model's experts are {type(bank).__name__}, not an ExpertBank "
                         "(is it already offloaded?)")
    bank_format(bank)  # refuses a bank the store cannot hold, before anything is written
    sizes_LE = tuple(tuple(sum(t.numel() * t.element_size() for t in _expert_tensors(m.experts, e))
                           for e in range(m.experts.num_experts)) for m in layers)
    counts = [len(row) for row in sizes_LE]
    sizes = {s for row in sizes_LE for s in row}
    return ExpertShape(len(layers), max(counts), max(sizes), tuple(counts) if len(set(counts)) > 1 else None,
                       sizes_LE if len(sizes) > 1 else None)


def plan_offload(model: nn.Module, shape: ExpertStore | ExpertShape, budget: str | int | float = "25%",
                 policy: str = "lru", scope: str = "layer", hot_set=None) -> tuple[CachePlan, list[list[int]] | None]:
    """Check a budget, policy, scope and static hot set against a store (or the `expert_shape` of the
    store a model will get) and return the cache plan and the hot keys (static) or None. Raises
    UsageError / ValueError / FileNotFoundError / TraceFormatError before anything is loaded or written."""
    layers = _layers(model, "offload")
    K = max(token_experts(layer) for layer in layers)
    plan = plan_cache(budget, shape, policy, scope, K)
    if policy != "static":
        return plan, None
    if hot_set is None:
        raise UsageError("policy 'static' needs a hot set: pass hot_set= a routing trace (file or RoutingTrace, "
                         "e.g. from `moekit analyze`) or per-(layer, expert) counts of shape (L, E)")
    return plan, hot_keys_from_counts(hot_counts(hot_set, shape.num_layers, shape.num_experts), plan)
