"""MoELayer = router + dispatch + routed experts (+ shared experts).

Legend: B batch, T tokens (flattened B*T inside), D model dim, E experts, N assignments.

Forward stages:
  1. router:   x_TD -> RouterOutput (ragged token/expert/weight triples, fp32 scores)
  2. padding:  assignments of padding tokens are removed (no FLOPs, no loss, no statistics)
  3. plan:     sort by expert, counts, offsets; capacity drops counted
  4. experts:  grouped GEMMs over the stacked weights
  5. combine:  weighted scatter-add back to tokens; + shared experts (optionally sigmoid-gated)
  6. losses:   aux losses returned in `routing_info().aux` (or attached to the output, see
               `attach_aux_losses`): unscaled, except a router's own loss that carries its adaptive
               coefficient (ReMoE's l1_reg; the router config says with `aux_loss_coefs`)

Capacity (`capacity_factor`) drops only in training; eval mode drops only with `eval_capacity_factor`.

`forward` always returns the output. A router that carries a routing state across layers (RMoE)
reads `router_state`; the state for the next layer is `routing_info().router_state` (for other
routers, the given state unchanged), and the model threads it (moekit.models.MoELM).

What concerns the optimiser step (step counts, global-batch f, selection-bias updates, k schedules)
lives in moekit.train.balance: a `BalanceTracker` sets `balance_tracker` on the layers it tracks, and
each training forward reports to it. The layer itself calls no collective and keeps no step state.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from moekit import losses
from moekit.config import MoEConfig
from moekit.dispatch import combine, make_plan, permute
from moekit.errors import UsageError
from moekit.experts import ExpertBank, SharedExpert
from moekit.ops.ffn import Activation
from moekit.ops.grouped import grouped_mm_available, warn_missing_kernel
from moekit.routers import RouterOutput, router_class
from moekit.routers.registry import router_aux_loss_names


@dataclass(frozen=True)
class RoutingInfo:
    """What the last forward did. Tensors are detached, except the aux losses.

    route: what the router chose (its assignments of valid tokens, before capacity dropping).
    executed: what ran (`route` after capacity dropping; rows grouped by expert when anything dropped).
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
            "counts": self.counts_E.tolist(),
        }


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
    def forward(ctx, y: torch.Tensor, aux_total: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(aux_total)
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        (aux_total,) = ctx.saved_tensors
        return grad_y, torch.ones_like(aux_total)


class MoELayer(nn.Module):
    def __init__(self, cfg: MoEConfig):
        super().__init__()
        cfg.validate()
        if cfg.backend == "grouped_mm" and not grouped_mm_available():
            raise UsageError("MoEConfig.backend='grouped_mm' is invalid; allowed: 'auto' (torch._grouped_mm is "
                             "missing from this torch build)")
        self.cfg = cfg
        self.router = router_class(cfg.router.kind)(cfg.router, cfg.d_model, cfg.num_experts)
        act = Activation(cfg.activation, cfg.activation_limit, cfg.activation_alpha, cfg.activation_up_offset)
        self.experts = ExpertBank(cfg.num_experts, cfg.d_model, cfg.d_expert, act)
        self.shared_experts = (SharedExpert(cfg.d_model, cfg.shared_width, cfg.activation)
                               if cfg.num_shared_experts > 0 else None)
        self.shared_expert_gate = (nn.Linear(cfg.d_model, 1, bias=False)
                                   if cfg.num_shared_experts > 0 and cfg.shared_gate else None)
        if not grouped_mm_available():
            warn_missing_kernel()
        # Per-layer coefficients of aux losses attached to the output (see `attach_aux_losses`).
        self.aux_loss_coefs: dict[str, float] | None = None
        # Set by moekit.train.balance.BalanceTracker: told about every training forward (see the module doc).
        self.balance_tracker = None
        self._info: RoutingInfo | None = None

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None,
                router_state: Any = None) -> torch.Tensor:
        """x: (B, T, D) or (T, D) (T = 0 gives an empty output and zero aux losses). padding_mask: same
        leading shape, True/1 for real tokens. router_state: the routing state from the previous MoE
        layer, for routers that carry one (see the module doc). Returns y, shaped like x."""
        if x.shape[-1] != self.cfg.d_model:
            raise ValueError(f"MoELayer: input last dim is {x.shape[-1]}, expected d_model={self.cfg.d_model}")
        if x.dim() not in (2, 3):
            raise ValueError(f"MoELayer: input must be (B, T, D) or (T, D), got shape {tuple(x.shape)}")
        lead_shape = x.shape[:-1]
        x_TD = x.reshape(-1, self.cfg.d_model)
        T = x_TD.shape[0]
        valid_T = None
        if padding_mask is not None:
            if padding_mask.shape != lead_shape:
                raise ValueError(f"MoELayer: padding_mask shape {tuple(padding_mask.shape)} does not match "
                                 f"the input's leading shape {tuple(lead_shape)}")
            valid_T = padding_mask.reshape(-1).to(device=x.device, dtype=torch.bool)
        tracker = self.balance_tracker if self.training else None
        counted = tracker.begin_pass(self) if tracker is not None else False

        route = self.router(x_TD, valid_T=valid_T, state=router_state)
        if valid_T is not None:
            route = route.keep(valid_T[route.token_idx_N])
        num_valid = T if valid_T is None else int(valid_T.sum())

        # Capacity limits are a training device: in eval mode only eval_capacity_factor drops.
        capacity_factor = self.cfg.capacity_factor if self.training else self.cfg.eval_capacity_factor
        plan = make_plan(route.token_idx_N, route.expert_idx_N, route.weight_N, self.cfg.num_experts, capacity_factor)
        x_ND, summed = permute(x_TD, plan), plan
        if self.cfg.weight_on_input:
            # Llama 4: each expert runs on its weighted input, and outputs are summed unweighted.
            x_ND = x_ND * plan.weight_N.to(x_ND.dtype).unsqueeze(-1)
            summed = dataclasses.replace(plan, weight_N=torch.ones_like(plan.weight_N))
        y_TD = combine(self.experts(x_ND, plan.offsets_E), summed, T, x_TD.dtype)

        if self.shared_experts is not None:
            shared_TD = self.shared_experts(x_TD)
            if self.shared_expert_gate is not None:
                shared_TD = torch.sigmoid(self.shared_expert_gate(x_TD)) * shared_TD
            y_TD = y_TD + shared_TD

        # Aux losses exist to be backpropagated: skip them when autograd is off (inference).
        aux = self._aux_losses(route, valid_T, num_valid, lead_shape, counted) if torch.is_grad_enabled() else {}
        if aux and self.training and self.aux_loss_coefs is not None:
            total = sum(c * aux[name] for name, c in self.aux_loss_coefs.items() if name in aux)
            if isinstance(total, torch.Tensor) and total.requires_grad:
                y_TD = _AttachAuxLoss.apply(y_TD, total)
            aux = {name: value.detach() for name, value in aux.items()}
        null_picks_T = route.extras.null_picks_T
        num_null = 0 if null_picks_T is None else int((null_picks_T if valid_T is None else null_picks_T[valid_T]).sum())
        chosen = route.detached()
        executed = chosen if plan.num_dropped == 0 else RouterOutput(
            plan.token_N, plan.expert_N, plan.weight_N.detach(), chosen.scores_TE, chosen.logits_TE, {}, chosen.extras)
        next_state = route.extras.state if route.extras.state is not None else router_state
        self._info = RoutingInfo(route=chosen, counts_E=plan.counts_E.detach(), num_dropped=plan.num_dropped,
                                 num_tokens=num_valid, num_null=num_null, aux=aux, executed=executed,
                                 router_state=next_state)
        if counted:
            tracker.record(self, self._info)
        return y_TD.view(*lead_shape, self.cfg.d_model)

    def _aux_losses(self, route: RouterOutput, valid_T: torch.Tensor | None, num_valid: int,
                    lead_shape: torch.Size, counted: bool) -> dict[str, torch.Tensor]:
        E = self.cfg.num_experts
        # f counts the router's choices before capacity dropping (see moekit.losses).
        token_idx_N, expert_idx_N = self.router.balance_assignment(route, valid_T)
        chosen_E = torch.bincount(expert_idx_N, minlength=E)
        probs_TE = self.router.balance_probs(route)
        aux = {}
        if self.cfg.balance_scope == "global":
            aux["load_balance"] = losses.global_load_balance_loss(
                probs_TE, self._global_f(chosen_E, num_valid, counted), valid_T)
        else:
            aux["load_balance"] = losses.load_balance_loss(probs_TE, chosen_E, num_valid, valid_T)
        aux["z_loss"] = losses.z_loss(route.logits_TE, valid_T)
        if len(lead_shape) == 2:
            B, T = lead_shape
            aux["seq_balance"] = losses.sequence_balance_loss(
                route.scores_TE.view(B, T, E), expert_idx_N, token_idx_N,
                self.cfg.expected_experts_per_token(), None if valid_T is None else valid_T.view(B, T))
        aux.update(self.router.aux_losses(route, valid_T))  # router-specific rules take precedence
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
        return self._info

    def extra_repr(self) -> str:
        cfg = self.cfg
        return (f"router={cfg.router.kind}({cfg.router.describe()}), E={cfg.num_experts}, "
                f"shared={cfg.num_shared_experts}, params={cfg.num_params():,}, "
                f"active_params={cfg.num_active_params():,}")


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
