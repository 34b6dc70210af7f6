"""MoELayer = router + dispatch + routed experts (+ shared experts).

Legend: B batch, T tokens (flattened B*T inside), D model dim, E experts, N assignments.

Forward stages:
  1. router:   x_TD -> RouterOutput (ragged token/expert/weight triples, fp32 scores)
  2. padding:  assignments of padding tokens are removed (no FLOPs, no loss, no statistics)
  3. plan:     sort by expert, counts, offsets; capacity drops counted
  4. experts:  grouped GEMMs over the stacked weights
  5. combine:  weighted scatter-add back to tokens; + shared experts (optionally sigmoid-gated)
  6. losses:   unscaled aux losses returned in `routing_info().aux` (or attached to the output,
               see `attach_aux_losses`)

Capacity (`capacity_factor`) drops only in training; eval mode drops only with `eval_capacity_factor`.

Recurrent routers (RMoE) need the routing state of the previous MoE layer: pass
`router_state=RecurrentState(gru)` to the first layer and each returned state to the next;
with `router_state` given, forward returns `(y, next_state)` (other routers hand it on unchanged).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from moekit import losses
from moekit.config import MoEConfig
from moekit.dispatch import combine, make_plan, permute
from moekit.experts import ExpertBank, SharedExpert
from moekit.ops.grouped import grouped_mm_available, warn_missing_kernel
from moekit.ops.reference import moe_reference
from moekit.routers import RecurrentState, RouterOutput, router_class
from moekit.routers.base import warn_once


@dataclass
class RoutingInfo:
    """What the last forward did. Tensors are detached, except the aux losses."""

    route: RouterOutput  # chosen: the router's assignments of valid tokens, before capacity dropping
    counts_E: torch.Tensor  # executed assignments per expert
    num_dropped: int
    num_tokens: int  # valid tokens
    num_null: int = 0  # picks of null experts (AdaMoE), which were never dispatched
    aux: dict[str, torch.Tensor] = field(default_factory=dict)
    executed: RouterOutput | None = None  # what ran: `route` after capacity dropping (rows grouped by expert)

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
AUX_LOSS_NAMES = (*LAYER_AUX_LOSS_NAMES, "dynamic")  # + the top-p rule's entropy loss


def aux_loss_names(cfg: MoEConfig) -> tuple[str, ...]:
    """The aux losses a training forward of a layer with this config returns in `routing_info().aux`."""
    return LAYER_AUX_LOSS_NAMES + router_class(cfg.router.kind).aux_loss_names(cfg.router)


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
        self.cfg = cfg
        self.router = router_class(cfg.router.kind)(cfg.router, cfg.d_model, cfg.num_experts)
        self.experts = ExpertBank(cfg.num_experts, cfg.d_model, cfg.d_expert, cfg.activation)
        self.shared_experts = (SharedExpert(cfg.d_model, cfg.shared_width, cfg.activation)
                               if cfg.num_shared_experts > 0 else None)
        self.shared_expert_gate = (nn.Linear(cfg.d_model, 1, bias=False)
                                   if cfg.num_shared_experts > 0 and cfg.shared_gate else None)
        self.use_reference = cfg.backend == "reference"
        if not grouped_mm_available():
            warn_missing_kernel()
        # Executed assignments per expert over the current optimiser step (training only), read by
        # the aux-loss-free bias update. Non-persistent: it is step state, not model state.
        self.register_buffer("step_counts_E", torch.zeros(cfg.num_experts, dtype=torch.int64), persistent=False)
        # Global-batch balance (balance_scope="global"): chosen counts and valid tokens summed
        # over this step's micro-batches so far (all-reduced over ranks); reset every optimiser step.
        self.register_buffer("global_counts_E", torch.zeros(cfg.num_experts, dtype=torch.int64), persistent=False)
        self.register_buffer("global_tokens", torch.zeros((), dtype=torch.int64), persistent=False)
        self._global_f_E: torch.Tensor | None = None  # f of the last counted forward, reused by recomputation
        # Training forwards run without autograd and not yet recomputed: each may be the first pass of a
        # reentrant activation checkpoint, whose recompute (inside backward) is then the pass that counts.
        self._unrecomputed = 0
        # Per-layer coefficients of aux losses attached to the output (see `attach_aux_losses`).
        self.aux_loss_coefs: dict[str, float] | None = None
        self._info: RoutingInfo | None = None

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None,
                router_state: RecurrentState | None = None) -> torch.Tensor | tuple[torch.Tensor, RecurrentState]:
        """x: (B, T, D) or (T, D) (T = 0 gives an empty output and zero aux losses). padding_mask: same
        leading shape, True/1 for real tokens. router_state: the recurrent routing state (see the module
        doc); when given, returns (y, state)."""
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
        counted = self._counted_pass()

        if self.router.kind == "recurrent":
            route = self.router(x_TD, router_state, valid_T=valid_T)
        else:
            route = self.router(x_TD, valid_T=valid_T)
        if valid_T is not None:
            route = route.keep(valid_T[route.token_idx_N])
        num_valid = T if valid_T is None else int(valid_T.sum())

        # Capacity limits are a training device: in eval mode only eval_capacity_factor drops.
        capacity_factor = self.cfg.capacity_factor if self.training else self.cfg.eval_capacity_factor
        plan = make_plan(route.token_idx_N, route.expert_idx_N, route.weight_N, self.cfg.num_experts, capacity_factor)
        if self.use_reference:
            y_TD = moe_reference(x_TD, plan.token_N, plan.expert_N, plan.weight_N, self.experts)
        else:
            y_ND = self.experts(permute(x_TD, plan), plan.offsets_E)
            y_TD = combine(y_ND, plan, T, x_TD.dtype)

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
        elif aux and counted and _in_backward():
            warn_once("reentrant-aux", "MoELayer: this forward ran inside backward (activation checkpointing with "
                      "use_reentrant=True), so its aux losses cannot join a loss computed before backward; "
                      "call moekit.attach_aux_losses(model, coefs) to attach them to the layer output")
        route.aux.update(aux)
        num_null = 0 if route.null_scores_TM is None else self.cfg.router.k * num_valid - route.num_assignments
        chosen = _detached(route)
        executed = chosen if plan.num_dropped == 0 else RouterOutput(
            plan.token_N, plan.expert_N, plan.weight_N.detach(), chosen.scores_TE, chosen.logits_TE, {},
            chosen.null_scores_TM)
        self._info = RoutingInfo(route=chosen, counts_E=plan.counts_E.detach(), num_dropped=plan.num_dropped,
                                 num_tokens=num_valid, num_null=num_null, aux=aux, executed=executed)
        if counted:
            # Megatron-LM updates its expert bias from the routing map after token dropping: executed counts.
            self.step_counts_E += plan.counts_E.detach()
        y = y_TD.view(*lead_shape, self.cfg.d_model)
        if router_state is None:
            return y
        if route.state_TH is not None:
            router_state = RecurrentState(router_state.gru, route.state_TH)
        return y, router_state

    def _counted_pass(self) -> bool:
        """Whether this forward's routing counts for the optimiser step (step counts, global-batch f).

        Exactly one pass per training micro-batch counts, whatever the activation checkpointing:
          no checkpointing, or use_reentrant=False: the forward (autograd on, outside backward);
            a non-reentrant recompute inside backward reuses it and counts nothing;
          use_reentrant=True: the forward runs without autograd, and its recompute inside backward
            (autograd on) is the pass whose graph backward walks, so that recompute counts.
        Eval mode and inference (autograd off) never count.
        """
        if not self.training:
            return False
        if not torch.is_grad_enabled():
            if not _in_backward():
                self._unrecomputed += 1  # maybe a reentrant checkpoint's first pass: its recompute will count
            return False
        if not _in_backward():
            self._unrecomputed = 0
            return True
        if self._unrecomputed > 0:
            self._unrecomputed -= 1
            return True
        return False

    def _aux_losses(self, route: RouterOutput, valid_T: torch.Tensor | None, num_valid: int,
                    lead_shape: torch.Size, counted: bool) -> dict[str, torch.Tensor]:
        aux = dict(route.aux)
        E = self.cfg.num_experts
        # f counts the router's choices before capacity dropping (see moekit.losses).
        token_idx_N, expert_idx_N = self.router.balance_assignment(route, valid_T)
        chosen_E = torch.bincount(expert_idx_N, minlength=E)
        # P averages probabilities: sigmoid scores are normalised per token first (Megatron-LM).
        probs_TE = losses.token_normalized(route.scores_TE) if self.cfg.router.score == "sigmoid" else route.scores_TE
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
        """f for global-batch balance (arXiv 2501.11873): micro-batch j of a step uses the chosen counts
        of micro-batches 1..j over all data-parallel ranks, divided by their valid tokens."""
        if not counted:
            if self.training and _in_backward() and self._global_f_E is not None:
                return self._global_f_E  # non-reentrant recomputation: the same f as the counted forward
            return chosen_E.float() / max(num_valid, 1)  # eval: nothing accumulates
        # One all-reduce of E + 1 numbers per layer per micro-batch.
        counts_X = torch.cat([chosen_E.detach().to(torch.int64), chosen_E.new_tensor([num_valid], dtype=torch.int64)])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(counts_X)
        self.global_counts_E += counts_X[:-1]
        self.global_tokens += counts_X[-1]
        self._global_f_E = self.global_counts_E.float() / self.global_tokens.clamp(min=1).float()
        return self._global_f_E

    def routing_info(self) -> RoutingInfo:
        if self._info is None:
            raise RuntimeError("MoELayer.routing_info(): no forward has run yet")
        return self._info

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Once per optimiser step: hand the router this step's executed counts (all-reduced over
        data-parallel ranks when torch.distributed is initialised) — the aux-loss-free bias update and
        k schedules use them — then reset them."""
        counts_E = self.step_counts_E.clone()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(counts_E)
        self.router.after_optimizer_step(counts_E)
        self.step_counts_E.zero_()
        self.global_counts_E.zero_()
        self.global_tokens.zero_()
        self._global_f_E = None
        self._unrecomputed = 0

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


def _in_backward() -> bool:
    """True while autograd runs a backward pass (where activation checkpointing recomputes)."""
    return torch._C._current_graph_task_id() != -1


def _detached(route: RouterOutput) -> RouterOutput:
    null = None if route.null_scores_TM is None else route.null_scores_TM.detach()
    return RouterOutput(route.token_idx_N, route.expert_idx_N, route.weight_N.detach(),
                        route.scores_TE.detach(), route.logits_TE.detach(), {}, null)


def after_optimizer_step(model: nn.Module) -> None:
    """Call once after each `optimizer.step()`: router state updates (aux-loss-free selection bias,
    k schedules) for every MoELayer of `model`."""
    for m in moe_layers(model):
        m.after_optimizer_step()


def attach_aux_losses(model: nn.Module, coefs: Mapping[str, float] | None) -> list[MoELayer]:
    """Attach the aux losses to every MoELayer's output, or detach them again (`coefs=None`).

    With coefficients attached, each training forward adds the gradient of
    sum_name coefs[name] * mean_over_layers(aux[name]) — the same as adding those terms to the loss,
    as `MoELM.aux_losses()` averages over MoE layers — through the layer output (Megatron-LM's
    MoEAuxLossAutoScaler), and `routing_info().aux` holds detached values, for logging only (adding
    them to a loss changes its value, not its gradient). This is the way aux losses reach the
    optimiser under activation checkpointing with use_reentrant=True, where the graph that backward
    walks is built inside backward. Divide the coefficients by the number of gradient-accumulation
    micro-batches if the task loss is divided so. Names: one of AUX_LOSS_NAMES. Returns the layers.
    """
    layers = moe_layers(model)
    if not layers:
        raise ValueError(f"attach_aux_losses(): {type(model).__name__} contains no MoELayer")
    per_layer = None
    if coefs is not None:
        unknown = sorted(set(coefs) - set(AUX_LOSS_NAMES))
        if unknown:
            raise ValueError(f"attach_aux_losses(): unknown aux losses {unknown}; allowed: {list(AUX_LOSS_NAMES)}")
        per_layer = {name: float(c) / len(layers) for name, c in coefs.items() if c}
    for layer in layers:
        layer.aux_loss_coefs = per_layer
    return layers
