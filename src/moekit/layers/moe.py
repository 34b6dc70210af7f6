"""MoELayer = router + dispatch + routed experts (+ shared experts).

Legend: B batch, T tokens (flattened B*T inside), D model dim, E experts, N assignments.

Forward stages:
  1. router:   x_TD -> RouterOutput (ragged token/expert/weight triples, fp32 scores)
  2. padding:  assignments of padding tokens are removed (no FLOPs, no loss, no statistics)
  3. plan:     sort by expert, counts, offsets; capacity drops counted
  4. experts:  grouped GEMMs over the stacked weights
  5. combine:  weighted scatter-add back to tokens; + shared experts (optionally sigmoid-gated)
  (3-5 go through `expert_dispatch` instead when moekit.parallel shards the experts over ranks)
  6. losses:   aux losses returned in `routing_info().aux` (or attached to the output, see
               `attach_aux_losses`): unscaled, except a router's own loss that carries its adaptive
               coefficient (ReMoE's l1_reg; the router config says with `aux_loss_coefs`)

Capacity (`capacity_factor`) drops only in training; eval mode drops only with `eval_capacity_factor`.

Inference path: with autograd off, in eval mode, for a plain layer (one iteration, no capacity, padding mask,
zero-computation / latent / output transforms, merged or sharded experts, router hooks) whose router gives a
dense choice (`Router.dense_choice`: the top-k rule without masks), stages 1-5 run straight-line on tensors
(`MoELayer._inference_forward`): the same ops in the same order, the same output bit for bit, and
`routing_info()` builds the same RoutingInfo when read. Not while torch.compile / torch.export trace the
layer (they take the general path). `reference_path()` turns it off (tests compare the two).

Layer architectures (MoEConfig options, each a branch of this one forward, none a separate layer):
  - Chain-of-Experts (iterations=C, arXiv 2506.18945): stages 1-5 run C times on a chain state
    h(0) = x, h(t) = h(t-1) + sum_i g(t,i) E_i(h(t-1)) [+ shared(h(t-1)) with iteration_shared], one router
    per iteration (`iteration_routers()`); the layer returns h(C) - x, the sum of the iterations'
    updates, so that C = 1 is the plain layer and the block's own residual adds x once. Aux losses are
    summed over the iteration gates (one loss per gate).
  - zero-computation experts (MoE++, arXiv 2410.07348): router columns E.. are zero experts (output 0;
    AdaMoE's null expert is the same thing), copy experts (output h, LongCat-Flash's "zero experts")
    and constant experts (a1*h + a2*v, [a1, a2] = softmax(W_c h)); none is dispatched or costs a GEMM.
    With a normalising router, weights are renormalised over the picks that are not zero experts (MoE++
    `gating`). gating_residual adds gate_map(previous MoE layer's logits) to this layer's logits.
  - latent experts (latent_dim=l, NVIDIA LatentMoE as transformers' nemotron_h): routed experts run in
    l dims between `fc1_latent_proj` (D->l, before dispatch) and `fc2_latent_proj` (l->D, after
    combine); router and shared experts read the D-dim input.
  - pre-gated routing (pregated, arXiv 2308.12066): the router reads the previous MoE layer's input.
Cross-layer inputs (pre-gating, gating residual) travel with the router state as a `LayerCarry`.

`forward` always returns the output. A router that carries a routing state across layers (RMoE)
reads `router_state`; the state for the next layer is `routing_info().router_state` (for other
routers, the given state unchanged), and the model threads it (moekit.models.MoELM).

What concerns the optimiser step (step counts, global-batch f, selection-bias updates, k schedules)
lives in moekit.train.balance: a `BalanceTracker` sets `balance_tracker` on the layers it tracks, and
each training forward reports to it. The layer itself calls no collective and keeps no step state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from moekit import losses
from moekit.config import MoEConfig
from moekit.dispatch import combine, combine_rows, make_plan, permute
from moekit.errors import UsageError
from moekit.experts import ExpertBank, SharedExpert
from moekit.experts.bank import ExpertLayout
from moekit.ops.ffn import Activation
from moekit.ops.grouped import grouped_mm_available, warn_missing_kernel
from moekit.ops.norm import FormRMSNorm
from moekit.routers import RouterOutput, router_class
from moekit.routers.base import FrozenAux
from moekit.routers.registry import router_aux_loss_names
from moekit.utils.counts import count_ids


@dataclass(frozen=True)
class RoutingInfo:
    """What the last forward did. Tensors are detached, except the aux losses.

    route: what the router chose (its assignments of valid tokens, before capacity dropping).
    executed: what ran (`route` after capacity dropping; rows grouped by expert when anything dropped;
        in route order when the experts are sharded over ranks).
    router_state: the routing state for the next MoE layer (see the module doc).
    """

    route: RouterOutput
    counts_E: torch.Tensor  # executed assignments per expert
    num_dropped: int
    num_tokens: int  # valid tokens
    num_null: int = 0  # picks of null experts (AdaMoE), which were never dispatched
    aux: Mapping[str, torch.Tensor] = field(default_factory=dict)
    executed: RouterOutput | None = None
    router_state: Any = None
    iteration_N: torch.Tensor | None = None  # per executed assignment: its Chain-of-Experts iteration
    zero_compute: Mapping[str, int] = field(default_factory=dict)  # picks of zero / copy / constant experts
    expert_flops: int = 0  # FLOPs of the routed FFN experts that ran (zero-computation experts: none)

    def __post_init__(self):
        if not isinstance(self.aux, FrozenAux) and not torch.compiler.is_compiling():  # read-only, like RouterOutput.aux
            object.__setattr__(self, "aux", FrozenAux(self.aux))

    @property
    def experts_per_token_T(self) -> torch.Tensor:
        return self.route.experts_per_token_T()

    def null_rate(self) -> float:
        """Share of the router's picks that went to null experts (0 without null experts)."""
        picks = self.num_null + self.route.num_assignments
        return self.num_null / picks if picks else 0.0

    def stats(self) -> dict[str, float | list[int]]:
        per_token = self.experts_per_token_T
        n = max(self.num_tokens, 1)
        total = max(self.route.num_assignments, 1)
        return {
            "tokens": self.num_tokens,
            "experts_per_token_mean": float(self.route.num_assignments) / n,
            "experts_per_token_hist": torch.bincount(per_token).tolist() if per_token.numel() else [],
            "dropped_rate": self.num_dropped / total,
            "null_rate": self.null_rate(),
            "zero_compute": dict(self.zero_compute),
            "expert_flops": self.expert_flops,
            "counts": self.counts_E.tolist(),
        }


@dataclass(frozen=True)
class LayerCarry:
    """What an MoE layer hands the next one (as its `router_state`) when the next one needs more than
    the router's own state: the gate input (pre-gated routing reads it) and the router logits over
    all X columns (the MoE++ gating residual adds a map of them)."""

    router_state: Any = None
    x_TD: torch.Tensor | None = None
    logits_TX: torch.Tensor | None = None


_NO_CARRY = LayerCarry()  # what a layer without a previous layer's routing state reads (immutable: shared)


LAYER_AUX_LOSS_NAMES = ("load_balance", "z_loss", "seq_balance")  # every router; seq_balance for (B, T, D) input


def aux_loss_names(cfg: MoEConfig) -> tuple[str, ...]:
    """The aux losses a training forward of a layer with this config returns in `routing_info().aux`."""
    return LAYER_AUX_LOSS_NAMES + cfg.router.aux_loss_names()


def all_aux_loss_names() -> tuple[str, ...]:
    """Every aux loss name a layer can return with any registered router."""
    return LAYER_AUX_LOSS_NAMES + tuple(n for n in router_aux_loss_names() if n not in LAYER_AUX_LOSS_NAMES)


class _AttachAuxLoss(torch.autograd.Function):
    """Identity on the layer output whose backward also sends gradient 1 to `aux_total` (Megatron-LM's
    MoEAuxLossAutoScaler): the aux losses reach the optimiser through the output, in whichever pass
    builds the graph that backward walks (the forward, or a reentrant checkpoint's recompute)."""

    @staticmethod
    def forward(y: torch.Tensor, aux_total: torch.Tensor) -> torch.Tensor:  # setup_context apart: torch.func's form
        return y

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[1])

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        (aux_total,) = ctx.saved_tensors
        return grad_y, torch.ones_like(aux_total)


_inference_path = True  # MoELayer's inference path may run (see `reference_path`)


@contextlib.contextmanager
def reference_path():
    """Test-only: inside the block every MoELayer takes its general forward, the reference of the inference
    path (`MoELayer._inference_forward`). Process-wide and not thread-safe."""
    global _inference_path
    before, _inference_path = _inference_path, False
    try:
        yield
    finally:
        _inference_path = before


class MoELayer(nn.Module):
    def __init__(self, cfg: MoEConfig):
        super().__init__()
        cfg.validate()
        if cfg.backend == "grouped_mm" and not grouped_mm_available():
            raise UsageError("MoEConfig.backend='grouped_mm' is invalid; allowed: 'auto' (torch._grouped_mm is "
                             "missing from this torch build)")
        self.cfg = cfg
        X = cfg.router_slots
        self.router = router_class(cfg.router.kind)(cfg.router, cfg.d_model, X)
        # Chain-of-Experts: iteration t > 0 has a router of its own (arXiv 2506.18945).
        self.chain_routers = nn.ModuleList(router_class(cfg.router.kind)(cfg.router, cfg.d_model, X)
                                           for _ in range(cfg.iterations - 1))
        act = Activation(cfg.activation, cfg.activation_limit, cfg.activation_alpha, cfg.activation_up_offset,
                         clamp_after=cfg.activation_clamp_after,
                         softcap=None if cfg.activation_softcap_gate is None
                         else (cfg.activation_softcap_gate, cfg.activation_softcap_up))
        self.experts = ExpertBank(cfg.num_experts, cfg.expert_dim, cfg.d_expert, act,
                                  hidden_dropout=cfg.expert_hidden_dropout)
        # Latent experts: names as transformers' NemotronHMoE, so its Parameters can be shared.
        self.fc1_latent_proj = self.fc2_latent_proj = None
        if cfg.latent_dim is not None:
            self.fc1_latent_proj = nn.Linear(cfg.d_model, cfg.latent_dim, bias=False)
            self.fc2_latent_proj = nn.Linear(cfg.latent_dim, cfg.d_model, bias=False)
        # RMSNorms of the experts' (latent) input and of each expert's output (Muse Spark; moekit.ops.norm).
        self.latent_norm = (FormRMSNorm(cfg.expert_dim, cfg.latent_norm_eps, cfg.latent_norm_form)
                            if cfg.latent_norm_eps is not None else None)
        self.expert_output_norm = (FormRMSNorm(cfg.expert_dim, cfg.expert_output_norm_eps, cfg.expert_output_norm_form)
                                   if cfg.expert_output_norm_eps is not None else None)
        # A bias on the layer's output, every token's (JetMoE's MoE block).
        self.output_bias = nn.Parameter(torch.zeros(cfg.d_model)) if cfg.output_bias else None
        # An RMSNorm of the layer's output (A.X-K1's post_mlp_layernorm), after the bias.
        self.output_norm = nn.RMSNorm(cfg.d_model, eps=cfg.output_norm_eps) if cfg.output_norm_eps else None
        # MoE++ constant experts: a vector v_j and a 2-way mixing gate W_c each (arXiv 2410.07348).
        self.constant_vec = self.constant_gate = None
        if cfg.constant_experts:
            self.constant_vec = nn.Parameter(torch.randn(cfg.constant_experts, cfg.d_model))
            self.constant_gate = nn.Parameter(torch.randn(cfg.constant_experts, 2, cfg.d_model) * cfg.d_model**-0.5)
        # MoE++ gating residual: logits += gate_map(previous layer's logits).
        self.gate_map = nn.Linear(X, X, bias=False) if cfg.gating_residual else None
        # The shared expert: the experts' activation (or its own), plain or clamped at its own limit.
        shared_act = cfg.shared_activation or cfg.activation
        if cfg.shared_activation_limit is not None:
            shared_act = dataclasses.replace(act, name=shared_act, limit=cfg.shared_activation_limit)
        self.shared_experts = (SharedExpert(cfg.d_model, cfg.shared_width, shared_act)
                               if cfg.num_shared_experts > 0 else None)
        # Router-weighted shared experts (Inkling): S experts every token runs, weighted per token by the router's
        # columns past the experts (RouteExtras.shared_weight_TS); a bank of S split stacks, as Inkling stores them.
        self.weighted_shared = cfg.router.weighted_shared_slots() > 0
        if self.weighted_shared:
            self.shared_experts = ExpertBank(cfg.num_shared_experts, cfg.d_model, cfg.d_shared or cfg.d_expert,
                                             shared_act, ExpertLayout(split=True))
        self.shared_expert_gate = (nn.Linear(cfg.d_model, 1, bias=False)
                                   if cfg.num_shared_experts > 0 and cfg.shared_gate else None)
        if not grouped_mm_available():
            warn_missing_kernel()
        # Merged experts (moekit.compress.merge, MC-SMoE's semantics): the router keeps its E experts and
        # expert_map_E (E,) int64 sends each to one of the bank's fewer experts. None: the identity.
        self.register_buffer("expert_map_E", None)
        # Per-layer coefficients of aux losses attached to the output (see `attach_aux_losses`).
        self.aux_loss_coefs: dict[str, float] | None = None
        # Set by moekit.train.balance.BalanceTracker: told about every training forward (see the module doc).
        self.balance_tracker = None
        # Set by moekit.parallel.apply_expert_parallel: runs stages 3-5 over experts sharded across ranks,
        # called as expert_dispatch(x_TD, token_idx_N, expert_idx_N, weight_N, experts, capacity_factor)
        # -> (y_TD, kept_N or None). None: this process holds every expert.
        self.expert_dispatch = None
        self._info: RoutingInfo | _DenseRoute | None = None

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None,
                router_state: Any = None, router_input: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, T, D) or (T, D) (T = 0 gives an empty output and zero aux losses). padding_mask: same
        leading shape, True/1 for real tokens. router_state: the routing state from the previous MoE
        layer, for routers that carry one (see the module doc). router_input: what the router reads
        instead of x, shaped like x (Gemma 4 routes the un-normed residual and runs the experts on a
        normed copy). Returns y, shaped like x."""
        if x.shape[-1] != self.cfg.d_model:
            raise ValueError(f"MoELayer: input last dim is {x.shape[-1]}, expected d_model={self.cfg.d_model}")
        if x.dim() not in (2, 3):
            raise ValueError(f"MoELayer: input must be (B, T, D) or (T, D), got shape {tuple(x.shape)}")
        lead_shape = x.shape[:-1]
        x_TD = x.reshape(-1, self.cfg.d_model)
        if padding_mask is None and router_state is None and router_input is None and self._plain_inference():
            y_TD = self._inference_forward(x_TD)
            if y_TD is not None:
                return y_TD.view(*lead_shape, self.cfg.d_model)
        T = x_TD.shape[0]
        valid_T = None
        if padding_mask is not None:
            if padding_mask.shape != lead_shape:
                raise ValueError(f"MoELayer: padding_mask shape {tuple(padding_mask.shape)} does not match "
                                 f"the input's leading shape {tuple(lead_shape)}")
            valid_T = padding_mask.reshape(-1).to(device=x.device, dtype=torch.bool)
        tracker = self.balance_tracker if self.training else None
        counted = tracker.begin_pass(self) if tracker is not None else False
        cfg = self.cfg
        carry = (router_state if isinstance(router_state, LayerCarry) else
                 _NO_CARRY if router_state is None else LayerCarry(router_state))
        num_valid = T if valid_T is None else int(valid_T.sum())
        if router_input is not None and router_input.shape[:-1].numel() != T:
            raise ValueError(f"MoELayer: router_input has shape {tuple(router_input.shape)}, expected {T} tokens "
                             f"of d_model={self.cfg.d_model} like x {tuple(x.shape)}")
        # Pre-gated MoE (arXiv 2308.12066): the gate reads the previous MoE layer's input.
        gate_in_TD = x_TD if router_input is None else router_input.reshape(T, -1)
        if cfg.pregated and carry.x_TD is not None:
            if carry.x_TD.shape != x_TD.shape:
                raise ValueError(f"MoELayer(pregated): the previous layer's input has shape {tuple(carry.x_TD.shape)}, "
                                 f"expected {tuple(x_TD.shape)}")
            gate_in_TD = carry.x_TD.to(x_TD.dtype)
        # MoE++ gating residual (arXiv 2410.07348): W_g applied to the previous layer's logits.
        logit_bias_TX = None
        if self.gate_map is not None and carry.logits_TX is not None:
            logit_bias_TX = torch.nn.functional.linear(carry.logits_TX, self.gate_map.weight.float())
        # Capacity limits are a training device: in eval mode only eval_capacity_factor drops.
        capacity_factor = cfg.capacity_factor if self.training else cfg.eval_capacity_factor
        want_aux = torch.is_grad_enabled()  # aux losses exist to be backpropagated: skip them in inference

        h_TD = x_TD  # Chain-of-Experts chain state h(t)
        y_TD = None
        aux: dict[str, torch.Tensor] = {}
        chosen, executed, iteration_N, counts_E = [], [], [], None
        num_dropped, zero_compute, flops = 0, {"zero": 0, "copy": 0, "constant": 0}, 0
        next_router_state, logits_out_TX = carry.router_state, None
        for t, router in enumerate((self.router,) if cfg.iterations == 1 else self.iteration_routers()):
            kwargs = {} if t or logit_bias_TX is None else {"logit_bias_TE": logit_bias_TX}
            route = router(gate_in_TD if t == 0 else h_TD, valid_T=valid_T, state=carry.router_state, **kwargs)
            if t == 0:
                logits_out_TX = route.logits_TE
                if route.extras.state is not None:
                    next_router_state = route.extras.state
            if valid_T is not None:
                route = route.keep(valid_T[route.token_idx_N])
            if want_aux:
                for name, value in self._aux_losses(router, route, valid_T, num_valid, lead_shape, counted).items():
                    aux[name] = aux[name] + value if name in aux else value  # one loss per iteration gate
            route, zc_route, zc_counts = self._split_zero_compute(route)
            e_in_TD = self.expert_input(h_TD)
            if self.expert_dispatch is None:
                # Merged experts (moekit.compress.merge): the router keeps its E experts, expert_map_E
                # sends each to the bank's expert that now computes it.
                expert_idx_N = (route.expert_idx_N if self.expert_map_E is None
                                else self.expert_map_E[route.expert_idx_N])
                weight_N, fits_N = route.weight_N, None
                if cfg.expert_capacity is not None or cfg.capacity_scope == "batch":
                    fits_N = self._within_capacity(route, lead_shape)
                    if cfg.capacity_renormalize:  # fairseq top2gating: the kept weights of a token sum to 1
                        kept_T = torch.zeros(T, dtype=weight_N.dtype, device=weight_N.device).index_add(
                            0, route.token_idx_N, torch.where(fits_N, weight_N, 0))
                        weight_N = weight_N / kept_T.clamp(min=torch.finfo(weight_N.dtype).eps)[route.token_idx_N]
                plan = make_plan(route.token_idx_N, expert_idx_N, weight_N, self.experts.num_experts,
                                 capacity_factor, keep_N=fits_N)
                x_ND, summed = permute(e_in_TD, plan), plan
                if cfg.weight_on_input:
                    # Llama 4: each expert runs on its weighted input, and outputs are summed unweighted.
                    x_ND = x_ND * plan.weight_N.to(x_ND.dtype).unsqueeze(-1)
                    summed = dataclasses.replace(plan, weight_N=torch.ones_like(plan.weight_N))
                y_ND = self.experts(x_ND, plan.offsets_E)
                if self.expert_output_norm is not None:  # each expert's output, before its weight
                    y_ND = self.expert_output_norm(y_ND)
                if cfg.expert_dropout:  # NLLB-MoE's moe_token_dropout as transformers runs it (arXiv 2207.04672)
                    y_ND = (torch.nn.functional.dropout(y_ND, cfg.expert_dropout) if self.training
                            else y_ND * (1.0 - cfg.expert_dropout))
                delta_TD = combine(y_ND, summed, T, e_in_TD.dtype)
                kept = None if plan.num_dropped == 0 else (plan.token_N, plan.expert_N, plan.weight_N)
                step_counts_E = plan.counts_E
            else:  # experts on other ranks too; a capacity is decided over the whole expert-parallel group
                if cfg.expert_capacity is not None or cfg.capacity_scope == "batch" or cfg.expert_dropout:
                    raise UsageError("MoEConfig.expert_capacity / capacity_scope='batch' / expert_dropout are not "
                                     "supported with experts sharded over ranks; use capacity_factor")
                delta_TD, kept_N = self.expert_dispatch(e_in_TD, route.token_idx_N, route.expert_idx_N,
                                                        route.weight_N, self.experts, capacity_factor)
                kept = (None if kept_N is None or bool(kept_N.all()) else
                        (route.token_idx_N[kept_N], route.expert_idx_N[kept_N], route.weight_N[kept_N]))
                step_counts_E = count_ids(route.expert_idx_N if kept is None else kept[1], cfg.num_experts)
            if self.fc2_latent_proj is not None:
                delta_TD = self.fc2_latent_proj(delta_TD)
            if zc_route is not None:
                delta_TD = delta_TD + self._zero_compute_out(h_TD, zc_route)
            if self.shared_experts is not None and (t == 0 or cfg.iteration_shared):
                delta_TD = delta_TD + self._shared_out(h_TD, route.extras.shared_weight_TS)
            y_TD = delta_TD if y_TD is None else y_TD + delta_TD
            if t + 1 < cfg.iterations:
                h_TD = h_TD + delta_TD  # CoE inner residual (arXiv 2506.18945)

            route_d = route.detached()
            chosen.append(route_d)
            executed.append(route_d if kept is None else RouterOutput(
                kept[0], kept[1], kept[2].detach(), route_d.scores_TE, route_d.logits_TE, {}, route_d.extras))
            if cfg.iterations > 1:
                iteration_N.append(torch.full_like(executed[-1].token_idx_N, t))
            counts_E = step_counts_E.detach() if counts_E is None else counts_E + step_counts_E.detach()
            dropped = 0 if kept is None else route.num_assignments - kept[0].numel()
            num_dropped += dropped
            flops += (route.num_assignments - dropped) * cfg.expert_flops()
            for name, n in zc_counts.items():
                zero_compute[name] += n

        if self.output_bias is not None:
            y_TD = y_TD + self.output_bias.to(y_TD.dtype)
        if self.output_norm is not None:
            y_TD = self.output_norm(y_TD)
        if aux and self.training and self.aux_loss_coefs is not None:
            total = sum(c * aux[name] for name, c in self.aux_loss_coefs.items() if name in aux)
            if isinstance(total, torch.Tensor) and total.requires_grad:
                y_TD = _AttachAuxLoss.apply(y_TD, total)
            aux = {name: value.detach() for name, value in aux.items()}
        null_picks_T = chosen[0].extras.null_picks_T
        num_null = 0 if null_picks_T is None else int((null_picks_T if valid_T is None else null_picks_T[valid_T]).sum())
        num_null += zero_compute["zero"]  # a zero expert is a null expert (AdaMoE)
        if cfg.pregated or cfg.gating_residual:
            next_router_state = LayerCarry(next_router_state, x_TD if cfg.pregated else None,
                                           logits_out_TX if cfg.gating_residual else None)
        info = RoutingInfo(route=_concat(chosen), counts_E=counts_E, num_dropped=num_dropped,
                           num_tokens=num_valid, num_null=num_null, aux=aux, executed=_concat(executed),
                           router_state=next_router_state,
                           iteration_N=torch.cat(iteration_N) if cfg.iterations > 1 else None,
                           zero_compute={k: v for k, v in zero_compute.items() if v or cfg.num_zero_compute},
                           expert_flops=flops)
        if torch.compiler.is_compiling():
            self._info = info
        else:  # not a parameter, buffer or module: skip nn.Module.__setattr__'s checks (a cost per layer call)
            object.__setattr__(self, "_info", info)
        if counted:
            tracker.record(self, self._info)
        return y_TD.view(*lead_shape, self.cfg.d_model)

    def _plain_inference(self) -> bool:
        """Whether this call may take `_inference_forward`: autograd off, eval mode, outside tracing, one
        iteration of a layer without capacity limits, zero-computation experts, latent or output transforms,
        merged or sharded experts, and a router without hooks (the HF wrapper records router logits by one)."""
        cfg, router = self.cfg, self.router
        return (_inference_path and not torch.is_grad_enabled() and not self.training and not torch.compiler.is_compiling()
                and cfg.iterations == 1 and cfg.num_zero_compute == 0 and cfg.expert_capacity is None
                and cfg.capacity_scope != "batch" and cfg.eval_capacity_factor is None and not cfg.expert_dropout
                and not cfg.pregated and self.gate_map is None
                and self.fc1_latent_proj is None and self.latent_norm is None and self.expert_output_norm is None
                and self.output_bias is None and self.output_norm is None and not self.weighted_shared
                and self.expert_map_E is None and self.expert_dispatch is None
                and not (router._forward_hooks or router._forward_pre_hooks
                         or nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks))

    def _inference_forward(self, x_TD: torch.Tensor) -> torch.Tensor | None:
        """The plain layer's forward in inference (see `_plain_inference`) for a router with a dense choice
        (`Router.dense_choice`; None otherwise): the general path's ops in its order — gate, choice, stable
        sort by expert, gather, grouped FFN, weighted index_add, shared expert — with the same results
        bit for bit, without its RouterOutput, DispatchPlan and RoutingInfo objects (the Python cost that
        decoding pays per layer and token step). `routing_info()` builds the RoutingInfo when read."""
        choice = self.router.dense_choice(x_TD)
        if choice is None:
            return None
        idx_TK, w_TK = choice[0], choice[1]
        T, K = idx_TK.shape
        E = self.experts.num_experts
        expert_N, order_N = torch.sort(idx_TK.reshape(-1), stable=True)
        token_N = order_N // K  # the route is token-major: assignment n is token n // K's
        offsets_E = torch.searchsorted(expert_N, _expert_ids(E, expert_N), right=True,
                                       out_int32=True)  # = cumsum of the counts
        x_ND, w_N = x_TD.index_select(0, token_N), w_TK.reshape(-1).index_select(0, order_N)
        if self.cfg.weight_on_input:  # Llama 4: each expert runs on its weighted input; outputs summed unweighted
            x_ND = x_ND * w_N.to(x_ND.dtype).unsqueeze(-1)
        # moekit's own bank takes the rows' experts (its per-expert biases read them); wrappers of it may not.
        y_ND = (self.experts(x_ND, offsets_E, expert_N) if type(self.experts).forward is ExpertBank.forward
                else self.experts(x_ND, offsets_E))
        y_TD = combine_rows(y_ND, None if self.cfg.weight_on_input else w_N, token_N, T, x_TD.dtype, scratch=True)
        if self.shared_experts is not None:
            y_TD = y_TD + self._shared_out(x_TD, None)
        object.__setattr__(self, "_info", _DenseRoute(choice, offsets_E, self.cfg.expert_flops()))
        return y_TD

    def last_dense_choice(self) -> tuple[torch.Tensor, ...] | None:
        """The router's dense choice (idx_TK, w_TK, scores_TE, logits_TE; see `Router.dense_choice`) of the last
        call when it took the inference path, else None (read `routing_info()` then)."""
        return self._info.choice if isinstance(self._info, _DenseRoute) else None

    def _shared_out(self, h_TD: torch.Tensor, shared_weight_TS: torch.Tensor | None) -> torch.Tensor:
        """The shared experts' output for the chain state h_TD: plain, router-weighted (Inkling) and/or gated."""
        if self.weighted_shared:
            shared_TD = self._weighted_shared_out(h_TD, shared_weight_TS)
        else:
            shared_TD = self.shared_experts(h_TD)
        if self.shared_expert_gate is not None:
            shared_TD = torch.sigmoid(self.shared_expert_gate(h_TD)) * shared_TD
        return shared_TD

    def _weighted_shared_out(self, h_TD: torch.Tensor, w_TS: torch.Tensor) -> torch.Tensor:
        """sum_s w_TS[:, s] * FFN_s(h_TD): every token through each of the S shared experts (the bank's grouped
        GEMM over S groups of T rows), weighted by the router, summed in fp32 (Inkling's shared experts)."""
        T, S = h_TD.shape[0], w_TS.shape[1]
        offsets_S = torch.arange(1, S + 1, device=h_TD.device, dtype=torch.int32) * T
        y_STD = self.shared_experts(h_TD.repeat(S, 1), offsets_S).view(S, T, -1)
        return (y_STD.float() * w_TS.t().unsqueeze(-1).float()).sum(0).to(h_TD.dtype)

    def _within_capacity(self, route: RouterOutput, lead_shape: torch.Size) -> torch.Tensor:
        """keep_N: whether each assignment is among the first C of its expert in its capacity group.
        capacity_scope 'sequence' (Switch Transformers as transformers runs it, arXiv 2101.03961): a group per
        sequence (the rows of a (B, T, D) input), ranked in token order, C = expert_capacity. 'batch' (GShard
        top-2 gating as fairseq runs it for NLLB-MoE, arXiv 2006.16668): one group, ranked by (choice,
        position): a token's choices by descending weight (every first choice before any second), positions
        in token order or, with capacity_priority='score', by the token's top score, highest first (stable);
        C = expert_capacity or K * ceil(T / E), and ceil(eval_capacity_fraction * T) in eval mode where set."""
        cfg = self.cfg
        T, N = route.num_tokens, route.num_assignments
        X = route.scores_TE.shape[-1]
        device = route.token_idx_N.device
        if cfg.capacity_scope == "sequence":
            seq_len = lead_shape[-1] if len(lead_shape) == 2 else T
            group_N, capacity = route.token_idx_N // max(seq_len, 1), cfg.expert_capacity
            num_groups = T // max(seq_len, 1) + 1
            choice_N = torch.zeros_like(route.token_idx_N)
        else:
            group_N, num_groups = torch.zeros_like(route.token_idx_N), 1
            if not self.training and cfg.eval_capacity_fraction is not None:
                capacity = math.ceil(cfg.eval_capacity_fraction * T)
            elif cfg.expert_capacity is not None:
                capacity = cfg.expert_capacity
            else:  # GShard's 2S/E for top-2: K * ceil(T / E)
                capacity = round(cfg.router.expected_experts_per_token(X)) * math.ceil(T / cfg.num_experts)
            # each assignment's choice among its token's: by weight, descending (two stable sorts)
            by_weight_N = torch.argsort(route.weight_N.detach(), descending=True, stable=True)
            order_N = by_weight_N[torch.argsort(route.token_idx_N[by_weight_N], stable=True)]
            token_sorted_N = route.token_idx_N[order_N]
            starts_T = torch.cumsum(count_ids(token_sorted_N, T), 0) - count_ids(token_sorted_N, T)
            choice_N = torch.empty_like(order_N)
            choice_N[order_N] = torch.arange(N, device=device) - starts_T[token_sorted_N]
        if cfg.capacity_priority == "score":  # V-MoE's batch prioritized routing (arXiv 2106.05974)
            by_score_T = torch.argsort(route.scores_TE.detach().amax(-1), descending=True, stable=True)
            pos_T = torch.empty_like(by_score_T)
            pos_T[by_score_T] = torch.arange(T, device=device)
        else:
            pos_T = torch.arange(T, device=device)
        key_N = group_N * X + route.expert_idx_N  # a capacity count per (group, expert)
        order_N = torch.argsort((key_N * X + choice_N) * T + pos_T[route.token_idx_N])  # a token has < X choices
        key_sorted_N = key_N[order_N]
        counts_K = count_ids(key_sorted_N, num_groups * X)
        starts_K = torch.cumsum(counts_K, 0) - counts_K
        rank_N = torch.empty_like(order_N)
        rank_N[order_N] = torch.arange(N, device=device) - starts_K[key_sorted_N]
        return rank_N < capacity

    def iteration_routers(self) -> list[nn.Module]:
        """The router of each Chain-of-Experts iteration (`[self.router]` for a plain layer)."""
        return [self.router, *self.chain_routers]

    def receives_token_ids(self) -> bool:
        """Whether the model hands this layer its tokens' ids (the `router_state` hash routing reads): MoELM does;
        a wrapped transformers block only where transformers passes them (`moekit.hf.HFMoEBlock`)."""
        return True

    def expert_input(self, h_TD: torch.Tensor) -> torch.Tensor:
        """What the routed experts read of the layer's input h_TD (T, D): (T, expert_dim), through the latent
        projection and its norm where the layer has them (moekit.compress calibrates experts on it)."""
        e_in_TD = h_TD if self.fc1_latent_proj is None else self.fc1_latent_proj(h_TD)
        return e_in_TD if self.latent_norm is None else self.latent_norm(e_in_TD)

    def _split_zero_compute(self, route: RouterOutput):
        """(FFN-expert route with scores over the E FFN experts, zero-computation route or None, picks per kind).
        MoE++ zeroes a zero expert's gate and renormalises the others (SkyworkAI/MoE-plus-plus `gating`)."""
        cfg = self.cfg
        if cfg.num_zero_compute == 0:
            return route, None, {}
        E, Z, C = cfg.num_experts, cfg.zero_experts, cfg.copy_experts
        idx_N = route.expert_idx_N
        counts = {"zero": int(((idx_N >= E) & (idx_N < E + Z)).sum()),
                  "copy": int(((idx_N >= E + Z) & (idx_N < E + Z + C)).sum()),
                  "constant": int((idx_N >= E + Z + C).sum())}
        nonzero_N = (idx_N < E) | (idx_N >= E + Z)
        route = route.keep(nonzero_N)
        if Z and cfg.router.normalizes():
            sum_T = torch.zeros(route.num_tokens, dtype=route.weight_N.dtype, device=idx_N.device)
            sum_T = sum_T.index_add(0, route.token_idx_N, route.weight_N)
            sum_T = torch.where(sum_T == 0, 1.0, sum_T)  # a token whose picks are all zero experts outputs 0
            route = dataclasses.replace(route, weight_N=route.weight_N / sum_T[route.token_idx_N])
        ffn_N = route.expert_idx_N < E
        ffn = dataclasses.replace(route.keep(ffn_N), scores_TE=route.scores_TE[:, :E], logits_TE=route.logits_TE[:, :E])
        zc = route.keep(~ffn_N)
        return ffn, zc, counts

    def _zero_compute_out(self, h_TD: torch.Tensor, zc: RouterOutput) -> torch.Tensor:
        """sum over a token's copy and constant picks of weight * output (arXiv 2410.07348); rows only
        for the N picks, no GEMM. Copy: h. Constant j: a1*h + a2*v_j with [a1, a2] = softmax(W_c,j h)."""
        cfg = self.cfg
        out_TD = torch.zeros_like(h_TD)
        if zc.num_assignments == 0:
            return out_TD
        first_const = cfg.num_experts + cfg.zero_experts + cfg.copy_experts
        h_ND = h_TD[zc.token_idx_N]
        out_ND = h_ND
        const_N = zc.expert_idx_N >= first_const
        if self.constant_vec is not None and bool(const_N.any()):
            j_N = (zc.expert_idx_N - first_const).clamp(min=0)
            a_N2 = torch.softmax(torch.einsum("nd,nkd->nk", h_ND.float(), self.constant_gate[j_N].float()), dim=-1)
            const_ND = a_N2[:, :1] * h_ND.float() + a_N2[:, 1:] * self.constant_vec[j_N].float()
            out_ND = torch.where(const_N[:, None], const_ND.to(h_ND.dtype), h_ND)
        return out_TD.index_add(0, zc.token_idx_N, out_ND * zc.weight_N[:, None].to(h_ND.dtype))

    def _aux_losses(self, router, route: RouterOutput, valid_T: torch.Tensor | None, num_valid: int,
                    lead_shape: torch.Size, counted: bool) -> dict[str, torch.Tensor]:
        E = route.num_experts  # every column the router scores: zero-computation experts are balanced too
        # f counts the router's choices before capacity dropping (see moekit.losses).
        token_idx_N, expert_idx_N = router.balance_assignment(route, valid_T)
        chosen_E = count_ids(expert_idx_N, E)
        tracker = self.balance_tracker
        # Micro scope over data-parallel ranks: f counts the whole split micro-batch (one all-reduce);
        # global scope has its own running f (below).
        batch_counts = (tracker.micro_counts(self, chosen_E, num_valid, counted)
                        if self.training and tracker is not None and tracker.group is not None
                        and self.cfg.balance_scope == "micro" else None)
        probs_TE = router.balance_probs(route)
        aux = {}
        if self.cfg.balance_scope == "global":
            aux["load_balance"] = losses.global_load_balance_loss(
                probs_TE, self._global_f(chosen_E, num_valid, counted), valid_T)
        elif batch_counts is not None:
            # The micro-batch is split over data-parallel ranks: f counts the whole micro-batch, as one
            # process holding it would (each rank's P_i is its own tokens' mean; their average is the global P_i).
            f_E = batch_counts[0].float() / batch_counts[1].clamp(min=1).float()
            aux["load_balance"] = losses.global_load_balance_loss(probs_TE, f_E, valid_T)
        else:
            aux["load_balance"] = losses.load_balance_loss(probs_TE, chosen_E, num_valid, valid_T)
        aux["z_loss"] = losses.z_loss(route.logits_TE, valid_T)
        if len(lead_shape) == 2:
            B, T = lead_shape
            aux["seq_balance"] = losses.sequence_balance_loss(
                route.scores_TE.view(B, T, E), expert_idx_N, token_idx_N,
                self.cfg.router.expected_experts_per_token(self.cfg.router_slots), None if valid_T is None else valid_T.view(B, T))
        aux.update(router.aux_losses(route, valid_T, batch_counts))  # router-specific rules take precedence
        return aux

    def _global_f(self, chosen_E: torch.Tensor, num_valid: int, counted: bool) -> torch.Tensor:
        """f for global-batch balance (arXiv 2501.11873): in training, the step's running f from the
        BalanceTracker (micro-batch j uses micro-batches 1..j of every data-parallel rank); in eval, this
        batch's own."""
        if not self.training:
            return chosen_E.float() / max(num_valid, 1)
        if self.balance_tracker is None:
            raise UsageError("MoEConfig.balance_scope='global' accumulates f over an optimiser step: create "
                             "moekit.BalanceTracker(model, group=...) before the first training forward")
        return self.balance_tracker.global_f(self, chosen_E, num_valid, counted)

    def routing_info(self) -> RoutingInfo:
        if self._info is None:
            raise RuntimeError("MoELayer.routing_info(): no forward has run yet")
        info = self._info
        if isinstance(info, _DenseRoute):  # the inference path's tensors: the RoutingInfo of the general path
            info = info.build()
            object.__setattr__(self, "_info", info)
        if not torch.compiler.is_compiling():  # a compiled forward left plain dicts (see RoutingInfo): freeze them
            for holder in (info, info.route):
                if not isinstance(holder.aux, FrozenAux):
                    object.__setattr__(holder, "aux", FrozenAux(holder.aux))
        return info

    def extra_repr(self) -> str:
        cfg = self.cfg
        arch = "".join(f", {name}={getattr(cfg, name)}" for name, default in (
            ("iterations", 1), ("zero_experts", 0), ("copy_experts", 0), ("constant_experts", 0),
            ("gating_residual", False), ("latent_dim", None), ("pregated", False), ("expert_capacity", None),
            ("capacity_scope", "sequence"), ("eval_capacity_fraction", None), ("expert_dropout", 0.0),
            ("output_bias", False), ("output_norm_eps", None)) if getattr(cfg, name) != default)
        return (f"router={cfg.router.kind}({cfg.router.describe()}), E={cfg.num_experts}{arch}, "
                f"shared={cfg.num_shared_experts}, params={cfg.num_params():,}, "
                f"active_params={cfg.num_active_params():,}")


def _expert_ids(num_experts: int, like: torch.Tensor) -> torch.Tensor:
    """arange(E) on `like`'s device, made once per (E, device) (the inference path's offsets search it at
    every call). Made afresh, never kept, for a tensor subclass (a FakeTensor kept would break every real
    call after it) and while a CUDA graph captures (the arange is then only recorded: until a replay its
    memory holds no ids, and eager calls would read it)."""
    if type(like) is not torch.Tensor or (like.is_cuda and torch.cuda.is_current_stream_capturing()):
        return torch.arange(num_experts, device=like.device)
    return _kept_expert_ids(num_experts, like.device)


@functools.cache
def _kept_expert_ids(num_experts: int, device: torch.device) -> torch.Tensor:
    return torch.arange(num_experts, device=device)


@dataclass(frozen=True)
class _DenseRoute:
    """What `MoELayer._inference_forward` keeps of a call: the router's dense choice (idx_TK, w_TK, scores_TE,
    logits_TE), the offsets and the FLOPs per assignment; `build` makes the RoutingInfo the general path
    makes for that call (no drops, null or zero-computation picks, aux losses or router state)."""

    choice: tuple[torch.Tensor, ...]
    offsets_E: torch.Tensor
    flops_per_assignment: int

    def build(self) -> RoutingInfo:
        route = RouterOutput.from_topk(*self.choice)
        counts_E = torch.diff(self.offsets_E.long(), prepend=self.offsets_E.new_zeros(1, dtype=torch.int64))
        return RoutingInfo(route=route, counts_E=counts_E, num_dropped=0, num_tokens=route.num_tokens, aux={},
                           executed=route, expert_flops=route.num_assignments * self.flops_per_assignment)


def _concat(routes: list[RouterOutput]) -> RouterOutput:
    """One RouterOutput of the Chain-of-Experts iterations' assignments (scores of the first iteration)."""
    if len(routes) == 1:
        return routes[0]
    first = routes[0]
    return dataclasses.replace(first, token_idx_N=torch.cat([r.token_idx_N for r in routes]),
                               expert_idx_N=torch.cat([r.expert_idx_N for r in routes]),
                               weight_N=torch.cat([r.weight_N for r in routes]))


def moe_layers(model: nn.Module) -> list[MoELayer]:
    """Every MoELayer of `model` (itself included), in module order: the order in which MoE-layer
    indices count everywhere (`moekit.route(layers=...)`, `mask_experts`, traces, expert stores)."""
    return [m for m in model.modules() if isinstance(m, MoELayer)]


def moe_layer_names(model: nn.Module) -> list[str]:
    """The module name of each of `moe_layers(model)` (the class name for `model` itself)."""
    return [name or type(m).__name__ for name, m in model.named_modules() if isinstance(m, MoELayer)]


def attach_aux_losses(model: nn.Module, coefs: Mapping[str, float] | None) -> list[MoELayer]:
    """Attach the aux losses to every MoELayer's output, or detach them again (`coefs=None`).

    With coefficients attached, each training forward adds the gradient of
    sum_name coefs[name] * mean_over_layers(aux[name]) — the same as adding those terms to the loss,
    as `MoELM.aux_losses()` averages over MoE layers — through the layer output (Megatron-LM's
    MoEAuxLossAutoScaler), and `routing_info().aux` holds detached values, for logging only (adding
    them to a loss changes its value, not its gradient). This is the way aux losses reach the
    optimiser under activation checkpointing with use_reentrant=True, where the graph that backward
    walks is built inside backward. Divide the coefficients by the number of gradient-accumulation
    micro-batches if the task loss is divided so. Names: see `all_aux_loss_names()`. Returns the layers.
    """
    layers = moe_layers(model)
    if not layers:
        raise ValueError(f"attach_aux_losses(): {type(model).__name__} contains no MoELayer")
    per_layer = None
    if coefs is not None:
        allowed = all_aux_loss_names()
        unknown = sorted(set(coefs) - set(allowed))
        if unknown:
            raise ValueError(f"attach_aux_losses(): unknown aux losses {unknown}; allowed: {list(allowed)}")
        per_layer = {name: float(c) / len(layers) for name, c in coefs.items() if c}
    for layer in layers:
        layer.aux_loss_coefs = per_layer
    return layers
