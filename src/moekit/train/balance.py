"""Routing state that belongs to the optimiser step, kept out of the model.

    tracker = moekit.BalanceTracker(model, group=dp_group).attach(optimizer)
    for step ...:
        for micro-batch ...: loss(model(x)).backward()
        optimizer.step()          # the tracker's step hook runs the routers' once-per-step updates

A `BalanceTracker` sets itself as `balance_tracker` on every MoELayer of the model. Each training
forward of a layer then reports to it:
  1. `begin_pass`: whether this pass counts for the step. Exactly one pass per micro-batch counts,
     whatever the activation checkpointing: no checkpointing or use_reentrant=False: the forward
     (autograd on, outside backward; a non-reentrant recompute inside backward reuses it);
     use_reentrant=True: the forward runs without autograd and its recompute inside backward (autograd
     on) is the pass whose graph backward walks, so that recompute counts. No-grad and eval forwards
     never count.
  2. `global_f` (balance_scope="global", arXiv 2501.11873): micro-batch j of a step uses the chosen
     counts of micro-batches 1..j over the ranks of `group` divided by their valid tokens: one
     all-reduce of E + 1 numbers per layer per counted micro-batch. The layer calls no collective.
     With a group, balance_scope="micro" (and a router's own count-ratio losses) count the micro-batch
     of every rank (`micro_counts`).
  3. `record`: the counted pass's executed and chosen counts and valid tokens.
After `optimizer.step()` (a step post-hook), `step()` sums every layer's counts over the ranks of
`group` in ONE all-reduce, hands them to the routers (`Router.after_optimizer_step_all`: aux-loss-free
selection bias, k schedules, ReMoE's L1 coefficient) and resets.

`group`: the process group of the data-parallel ranks that see different tokens of the same experts
(not the default group: with expert parallelism it differs). None: no reduction (one process).
`moekit.after_optimizer_step(model)` does the step by hand for users without a hooked optimiser.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from moekit.dispatch.expert_parallel import ExchangeError
from moekit.layers.moe import MoELayer, RoutingInfo
from moekit.layers.overrides import moe_layers
from moekit.routers.base import StepCounts, warn_once
from moekit.utils.autograd import in_backward

__all__ = ["BalanceTracker", "after_optimizer_step"]


@dataclass
class _LayerStep:
    executed_E: torch.Tensor  # int64 (E,): executed assignments this step (local)
    chosen_E: torch.Tensor  # int64 (E,): the router's choices over valid tokens (local)
    tokens: torch.Tensor  # int64 (): valid tokens (local)
    global_E: torch.Tensor  # int64 (E,): balance counts of this step's micro-batches so far, all ranks
    global_tokens: torch.Tensor  # int64 (): their valid tokens, all ranks
    global_f_E: torch.Tensor | None = None  # f of the last counted pass, reused by its recompute
    micro_counts_X: torch.Tensor | None = None  # the same for `micro_counts`
    unrecomputed: int = 0  # no-grad training passes that may be a reentrant checkpoint's first pass

    @staticmethod
    def zeros(num_experts: int, device: torch.device) -> _LayerStep:
        def z(*shape):
            return torch.zeros(shape, dtype=torch.int64, device=device)

        return _LayerStep(z(num_experts), z(num_experts), z(), z(num_experts), z())


def _untracked():
    return None


class BalanceTracker:
    """The optimiser-step routing state of `model`'s MoE layers (see the module doc).

    model: a module holding MoELayers (or an iterable of MoELayers). group: a torch.distributed process
    group over which counts are summed, or None (no reduction). A layer is tracked by at most one
    tracker (ValueError otherwise; `detach()` releases them).
    """

    def __init__(self, model: nn.Module | Iterable[MoELayer], group=None):
        layers = moe_layers(model) if isinstance(model, nn.Module) else list(model)
        if not layers:
            raise ValueError(f"BalanceTracker: {type(model).__name__} contains no MoELayer")
        for layer in layers:
            if layer.balance_tracker is not None and layer.balance_tracker is not self:
                raise ValueError("BalanceTracker: a MoE layer is already tracked by another BalanceTracker; call its "
                                 "detach() first")
        self.layers = layers
        self.group = group
        self._index = {id(layer): i for i, layer in enumerate(layers)}
        self._state = [_LayerStep.zeros(layer.cfg.num_experts, layer.router.weight.device) for layer in layers]
        self._hook = None
        for layer in layers:
            layer.balance_tracker = self

    # A copied or pickled model is not tracked (its optimiser is not this one's).
    def __deepcopy__(self, memo):
        return None

    def __reduce__(self):
        return (_untracked, ())

    def attach(self, optimizer: torch.optim.Optimizer) -> BalanceTracker:
        """Run `step()` after every `optimizer.step()` (a step post-hook). Returns self."""
        if self._hook is not None:
            self._hook.remove()
        self._hook = optimizer.register_step_post_hook(lambda _opt, _args, _kwargs: self.step())
        return self

    @property
    def attached(self) -> bool:
        return self._hook is not None

    def detach(self) -> None:
        """Stop tracking: remove the optimiser hook and release the layers."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        for layer in self.layers:
            if layer.balance_tracker is self:
                layer.balance_tracker = None

    # ------------------------------------------------------------------ called by MoELayer.forward
    def _of(self, layer: MoELayer) -> _LayerStep:
        i = self._index[id(layer)]
        s = self._state[i]
        device = layer.router.weight.device
        if s.executed_E.device != device:  # the model moved since: the counts follow it
            self._state[i] = s = _LayerStep(*(t.to(device) for t in (s.executed_E, s.chosen_E, s.tokens, s.global_E,
                                                                      s.global_tokens)), s.global_f_E, s.micro_counts_X,
                                                                     s.unrecomputed)
        return s

    def begin_pass(self, layer: MoELayer) -> bool:
        """Whether this training forward of `layer` counts for the optimiser step (see the module doc)."""
        s = self._of(layer)
        if not torch.is_grad_enabled():
            if not in_backward():
                s.unrecomputed += 1  # maybe a reentrant checkpoint's first pass: its recompute will count
            return False
        if not in_backward():
            s.unrecomputed = 0
            return True
        if s.unrecomputed > 0:
            s.unrecomputed -= 1
            return True
        return False

    def global_f(self, layer: MoELayer, chosen_E: torch.Tensor, num_valid: int, counted: bool) -> torch.Tensor:
        """f_E of global-batch balance for this micro-batch (arXiv 2501.11873)."""
        s = self._of(layer)
        if not counted:
            if in_backward() and s.global_f_E is not None:
                return s.global_f_E  # non-reentrant recomputation: the same f as the counted forward
            return chosen_E.float() / max(num_valid, 1)
        # One all-reduce of E + 1 numbers per layer per micro-batch.
        counts_X = torch.cat([chosen_E.detach().to(torch.int64), chosen_E.new_tensor([num_valid], dtype=torch.int64)])
        if self.group is not None:
            _all_reduce(counts_X, self.group, "global-batch expert counts")
        s.global_E += counts_X[:-1]
        s.global_tokens += counts_X[-1]
        s.global_f_E = s.global_E.float() / s.global_tokens.clamp(min=1).float()
        return s.global_f_E

    def micro_counts(self, layer: MoELayer, chosen_E: torch.Tensor, num_valid: int,
                     counted: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The router's chosen counts (E,) and valid tokens () of this micro-batch over every rank of
        `group`: a micro-batch split over data-parallel ranks balances as one process holding all of it
        would. One all-reduce of E + 1 numbers per layer per forward; a recompute reuses the counted pass's."""
        s = self._of(layer)
        if not counted and in_backward() and s.micro_counts_X is not None:
            return s.micro_counts_X[:-1], s.micro_counts_X[-1]
        counts_X = torch.cat([chosen_E.detach().to(torch.int64), chosen_E.new_tensor([num_valid], dtype=torch.int64)])
        if self.group is not None:
            _all_reduce(counts_X, self.group, "the micro-batch's expert counts")
        if counted:
            s.micro_counts_X = counts_X
        return counts_X[:-1], counts_X[-1]

    def record(self, layer: MoELayer, info: RoutingInfo) -> None:
        """The counted pass's routing: executed and chosen counts, valid tokens."""
        s = self._of(layer)
        s.executed_E += info.counts_E
        s.chosen_E += info.route.counts_E()
        s.tokens += info.num_tokens
        if info.aux and in_backward() and layer.aux_loss_coefs is None:
            warn_once("reentrant-aux", "MoELayer: this forward ran inside backward (activation checkpointing with "
                      "use_reentrant=True), so its aux losses cannot join a loss computed before backward; "
                      "call moekit.attach_aux_losses(model, coefs) to attach them to the layer output")

    # ------------------------------------------------------------------ the optimiser step
    def counts(self, layer: MoELayer) -> StepCounts:
        """`layer`'s counts of the step so far (this process only)."""
        s = self._of(layer)
        return StepCounts(s.executed_E.clone(), s.chosen_E.clone(), int(s.tokens))

    def global_counts(self, layer: MoELayer) -> tuple[torch.Tensor, int]:
        """Global-batch balance: `layer`'s balance counts (E,) and valid tokens of this step's counted
        micro-batches so far, over the ranks of `group`."""
        s = self._of(layer)
        return s.global_E.clone(), int(s.global_tokens)

    def last_global_f(self, layer: MoELayer) -> torch.Tensor | None:
        """The f_E that `layer`'s last counted micro-batch used (balance_scope="global"), or None."""
        return self._of(layer).global_f_E

    @torch.no_grad()
    def step(self) -> None:
        """Once per optimiser step: sum the step's counts over `group` (one all-reduce), hand them to the
        routers, reset."""
        flat = torch.cat([torch.cat([s.executed_E, s.chosen_E, s.tokens.view(1)]) for s in self._state])
        if self.group is not None:
            _all_reduce(flat, self.group, "the step's expert counts")
        elif torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            warn_once("balance-no-group", "BalanceTracker(group=None) in a distributed run: expert counts are not "
                      "summed over ranks, so routers update from this rank's tokens only; pass the data-parallel "
                      "process group")
        by_class: dict[type, tuple[list, list]] = {}
        offset = 0
        for layer in self.layers:
            E = layer.cfg.num_experts
            counts = StepCounts(flat[offset:offset + E], flat[offset + E:offset + 2 * E], int(flat[offset + 2 * E]))
            offset += 2 * E + 1
            routers, per_layer = by_class.setdefault(type(layer.router), ([], []))
            # NOTE: a Chain-of-Experts layer's iteration routers each get the layer's counts (summed over its
            # iterations): the step state is kept per layer, not per iteration.
            for router in layer.iteration_routers():
                routers.append(router)
                per_layer.append(counts)
        for cls, (routers, per_layer) in by_class.items():
            cls.after_optimizer_step_all(routers, per_layer)
        for s in self._state:
            for t in (s.executed_E, s.chosen_E, s.tokens, s.global_E, s.global_tokens):
                t.zero_()
            s.global_f_E = s.micro_counts_X = None
            s.unrecomputed = 0


def after_optimizer_step(model: nn.Module, group=None) -> None:
    """Call once after each `optimizer.step()` when no BalanceTracker is attached to the optimiser: the
    routers' once-per-step updates (aux-loss-free selection bias, k schedules) from the step's counts.

    The model's BalanceTracker does the work; a model without one gets one (`group` as given) at the
    first call, which counts from then on: that first step's updates see no counts (create
    `moekit.BalanceTracker(model)` before the first forward to count it too). Trackers attached to an
    optimiser already ran in its step and are skipped.
    """
    layers = moe_layers(model)
    trackers = []
    for layer in layers:
        if layer.balance_tracker is not None and layer.balance_tracker not in trackers:
            trackers.append(layer.balance_tracker)
    untracked = [layer for layer in layers if layer.balance_tracker is None]
    if untracked:
        if any(layer.training and _has_run(layer) for layer in untracked):
            warnings.warn("moekit.after_optimizer_step: the model had no BalanceTracker during this step, so its "
                          "expert counts were not recorded (updates that read them, e.g. the aux-loss-free bias, "
                          "skip this step); tracking starts now (create moekit.BalanceTracker(model) before the "
                          "first forward)", UserWarning, stacklevel=2)
        trackers.append(BalanceTracker(untracked, group))
    for tracker in trackers:
        if not tracker.attached:
            tracker.step()


def _has_run(layer: MoELayer) -> bool:
    try:
        layer.routing_info()
    except RuntimeError:
        return False
    return True


def _all_reduce(t: torch.Tensor, group, what: str) -> None:
    """all_reduce over `group`; a failure (typically: another rank died) becomes one clear error."""
    try:
        torch.distributed.all_reduce(t, group=group)
    except RuntimeError as e:
        rank = torch.distributed.get_rank(group)
        raise ExchangeError(f"BalanceTracker: the all-reduce of {what} failed on rank {rank}; another rank "
                            f"probably failed first (see its error). Cause: {e}") from e
