"""MoELayer = router + dispatch + routed experts (+ shared experts).

Legend: B batch, T tokens (flattened B*T inside), D model dim, E experts, N assignments.

Forward stages:
  1. router:   x_TD -> RouterOutput (ragged token/expert/weight triples, fp32 scores)
  2. padding:  assignments of padding tokens are removed (no FLOPs, no loss, no statistics)
  3. plan:     sort by expert, counts, offsets; capacity drops counted
  4. experts:  grouped GEMMs over the stacked weights
  5. combine:  weighted scatter-add back to tokens; + shared experts (optionally sigmoid-gated)
  6. losses:   unscaled aux losses returned in `routing_info().aux`

Recurrent routers (RMoE) need the routing state of the previous MoE layer: pass
`router_state=RecurrentState(gru)` to the first layer and each returned state to the next;
with `router_state` given, forward returns `(y, next_state)` (other routers hand it on unchanged).
"""

from __future__ import annotations

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
        # Global-batch balance (balance_scope="global"): executed counts and valid tokens summed
        # over this step's micro-batches so far (all-reduced over ranks); reset every optimiser step.
        self.register_buffer("global_counts_E", torch.zeros(cfg.num_experts, dtype=torch.int64), persistent=False)
        self.register_buffer("global_tokens", torch.zeros((), dtype=torch.int64), persistent=False)
        self._global_f_E: torch.Tensor | None = None  # f of the last real forward, reused by recomputation
        self._info: RoutingInfo | None = None

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None,
                router_state: RecurrentState | None = None) -> torch.Tensor | tuple[torch.Tensor, RecurrentState]:
        """x: (B, T, D) or (T, D). padding_mask: same leading shape, True/1 for real tokens.
        router_state: the recurrent routing state (see the module doc); when given, returns (y, state)."""
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

        if self.router.kind == "recurrent":
            route = self.router(x_TD, router_state)
        else:
            route = self.router(x_TD)
        if valid_T is not None:
            route = route.keep(valid_T[route.token_idx_N])
        num_valid = T if valid_T is None else int(valid_T.sum())

        plan = make_plan(route.token_idx_N, route.expert_idx_N, route.weight_N, self.cfg.num_experts,
                         self.cfg.capacity_factor)
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
        aux = self._aux_losses(route, plan.counts_E, num_valid, valid_T, lead_shape) if torch.is_grad_enabled() else {}
        route.aux.update(aux)
        num_null = 0 if route.null_scores_TM is None else self.cfg.router.k * num_valid - route.num_assignments
        chosen = _detached(route)
        executed = chosen if plan.num_dropped == 0 else RouterOutput(
            plan.token_N, plan.expert_N, plan.weight_N.detach(), chosen.scores_TE, chosen.logits_TE, {},
            chosen.null_scores_TM)
        self._info = RoutingInfo(route=chosen, counts_E=plan.counts_E.detach(), num_dropped=plan.num_dropped,
                                 num_tokens=num_valid, num_null=num_null, aux=aux, executed=executed)
        if self._should_accumulate():
            self.step_counts_E += plan.counts_E.detach()
        y = y_TD.view(*lead_shape, self.cfg.d_model)
        if router_state is None:
            return y
        if route.state_TH is not None:
            router_state = RecurrentState(router_state.gru, route.state_TH)
        return y, router_state

    def _aux_losses(self, route: RouterOutput, counts_E: torch.Tensor, num_valid: int,
                    valid_T: torch.Tensor | None, lead_shape: torch.Size) -> dict[str, torch.Tensor]:
        aux = dict(route.aux)
        if self.cfg.balance_scope == "global":
            aux["load_balance"] = losses.global_load_balance_loss(route.scores_TE, self._global_f(counts_E, num_valid),
                                                                  valid_T)
        else:
            aux["load_balance"] = losses.load_balance_loss(route.scores_TE, counts_E, num_valid, valid_T)
        aux["z_loss"] = losses.z_loss(route.logits_TE, valid_T)
        if len(lead_shape) == 2:
            B, T = lead_shape
            aux["seq_balance"] = losses.sequence_balance_loss(
                route.scores_TE.view(B, T, -1), route.expert_idx_N, route.token_idx_N,
                self.cfg.expected_experts_per_token(), None if valid_T is None else valid_T.view(B, T))
        aux.update(self.router.aux_losses(route, valid_T))  # router-specific rules take precedence
        return aux

    def _global_f(self, counts_E: torch.Tensor, num_valid: int) -> torch.Tensor:
        """f for global-batch balance (arXiv 2501.11873): micro-batch j of a step uses the counts of
        micro-batches 1..j over all data-parallel ranks, divided by their valid tokens."""
        if torch._C._current_graph_task_id() != -1 and self._global_f_E is not None:
            return self._global_f_E  # activation recomputation: the same f as the real forward
        if not (self.training and torch.is_grad_enabled()):
            return counts_E.float() / max(num_valid, 1)  # eval: nothing accumulates
        # One all-reduce of E + 1 numbers per layer per micro-batch.
        counts_X = torch.cat([counts_E.detach().to(torch.int64), counts_E.new_tensor([num_valid], dtype=torch.int64)])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(counts_X)
        self.global_counts_E += counts_X[:-1]
        self.global_tokens += counts_X[-1]
        self._global_f_E = self.global_counts_E.float() / self.global_tokens.clamp(min=1).float()
        return self._global_f_E

    def _should_accumulate(self) -> bool:
        # NOTE: once per real forward of a training step: not in eval / no_grad, and not again when
        # activation checkpointing recomputes the forward inside backward.
        return self.training and torch.is_grad_enabled() and torch._C._current_graph_task_id() == -1

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

    def extra_repr(self) -> str:
        cfg = self.cfg
        return (f"router={cfg.router.kind}({cfg.router.describe()}), E={cfg.num_experts}, "
                f"shared={cfg.num_shared_experts}, params={cfg.num_params():,}, "
                f"active_params={cfg.num_active_params():,}")


def _detached(route: RouterOutput) -> RouterOutput:
    null = None if route.null_scores_TM is None else route.null_scores_TM.detach()
    return RouterOutput(route.token_idx_N, route.expert_idx_N, route.weight_N.detach(),
                        route.scores_TE.detach(), route.logits_TE.detach(), {}, null)


def after_optimizer_step(model: nn.Module) -> None:
    """Call once after each `optimizer.step()`: router state updates (aux-loss-free selection bias,
    k schedules) for every MoELayer of `model`."""
    for m in model.modules():
        if isinstance(m, MoELayer):
            m.after_optimizer_step()
