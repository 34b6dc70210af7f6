"""The adapter layer contract, plain LoRA, and the helpers routed adapters share.

Legend: T tokens (all leading dims flattened), I in_features, O out_features, r LoRA rank,
E experts, N assignments.

An adapter layer wraps one `nn.Linear` (`base_layer`, frozen) and adds an update:

    forward(x) = base_layer(x) + delta(x)

`delta` runs in the adapter's own dtype (fp32 parameters, as PEFT's default `autocast_adapter_dtype`)
and is cast back to the base output's dtype. Aux losses are computed when autograd is on and kept on
the layer until the next forward (`aux`, unscaled; `aux_loss()`, weighted by the config).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import nn

from moekit import losses
from moekit.adapters.config import AdapterConfig, LoRAConfig, _RoutedConfig
from moekit.errors import UsageError
from moekit.routers import StepCounts, router_class

_LAYERS: dict[str, type[AdapterLayer]] = {}


def register_layer(cls: type[AdapterLayer]) -> type[AdapterLayer]:
    """Class decorator: the layer that implements `cls.config_class.method` (duplicates raise)."""
    method = cls.config_class.method
    if method in _LAYERS:
        raise ValueError(f"adapter method {method!r} already has a layer ({_LAYERS[method].__name__})")
    _LAYERS[method] = cls
    return cls


def layer_class(method: str) -> type[AdapterLayer]:
    if method not in _LAYERS:
        raise UsageError(f"adapter method {method!r} has no layer; registered: {sorted(_LAYERS)}")
    return _LAYERS[method]


class AdapterLayer(nn.Module):
    """Base of every adapter layer: `base_layer` (the wrapped nn.Linear) plus `delta(x_TI)`.

    `index`: the layer's position among the model's adapted modules (seeds per-layer randomness).
    Subclasses set `config_class` and implement `delta`; mergeable ones implement `delta_weight`.
    """

    config_class: ClassVar[type[AdapterConfig]] = AdapterConfig

    def __init__(self, base_layer: nn.Linear, cfg: AdapterConfig, index: int = 0):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"{type(self).__name__} wraps a torch.nn.Linear, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.cfg = cfg
        self.index = index
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.scaling = cfg.scaling
        self.lora_dropout = nn.Dropout(cfg.lora_dropout) if cfg.lora_dropout > 0 else nn.Identity()
        self.merged = False
        self.disabled = False
        self.aux: dict[str, torch.Tensor] = {}
        self._original_weight: torch.Tensor | None = None
        self._lead_shape: torch.Size = torch.Size()

    @property
    def device(self) -> torch.device:
        return self.base_layer.weight.device

    def adapter_dtype(self) -> torch.dtype:
        for p in self.parameters(recurse=True):
            if p is not self.base_layer.weight and p is not self.base_layer.bias:
                return p.dtype
        return torch.float32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.disabled or self.merged:
            return y
        self._lead_shape = x.shape[:-1]
        x_TI = x.reshape(-1, self.in_features).to(self.adapter_dtype())
        delta_TO = self.delta(x_TI)
        return y + delta_TO.to(y.dtype).view(*x.shape[:-1], self.out_features)

    def delta(self, x_TI: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def aux_loss(self) -> torch.Tensor | None:
        """The last forward's aux losses, weighted by the config (None when it has none)."""
        return None

    def after_optimizer_step(self) -> None:
        """Once per optimiser step: stateful routing updates (default: none)."""

    # ------------------------------------------------------------------ merging
    def delta_weight(self) -> torch.Tensor:
        """The update as one (O, I) matrix, for methods whose update does not depend on the input."""
        raise UsageError(f"{self.cfg.method} adapters cannot be merged into the base weights: their update depends "
                         "on the input (a router or a top-k mask picks it per token); only lora merges")

    @torch.no_grad()
    def merge(self) -> None:
        """W += delta_weight (computed in fp32, rounded once to W's dtype). The original W is kept, so
        `unmerge` restores it bit for bit."""
        if self.merged:
            raise UsageError("merge: this adapter is already merged")
        W = self.base_layer.weight
        delta_OI = self.delta_weight().float()
        self._original_weight = W.detach().clone()
        W.copy_((W.float() + delta_OI.to(W.device)).to(W.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            raise UsageError("unmerge: this adapter is not merged")
        self.base_layer.weight.copy_(self._original_weight)
        self._original_weight = None
        self.merged = False

    def base_weights(self) -> list[torch.Tensor]:
        """The base tensors `merge` changes."""
        return [self.base_layer.weight]

    def unload(self) -> nn.Linear:
        """The base layer, without the copy of its original weight that a merge keeps (merge_and_unload)."""
        self._original_weight = None
        return self.base_layer

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """The adapter's tensors (parameters and persistent buffers; the base layer's excluded), keyed by
        their names in this module, as saved (see moekit.adapters.store)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("base_layer.")}

    @torch.no_grad()
    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        """Copy tensors of `adapter_state`'s keys and shapes into the adapter."""
        own = self.adapter_state()
        for key, value in state.items():
            own[key].copy_(value.to(own[key].dtype))

    def extra_repr(self) -> str:
        return f"{self.cfg.describe()}, in_features={self.in_features}, out_features={self.out_features}"


def lora_pair(in_features: int, r: int, out_features: int, device) -> tuple[nn.Linear, nn.Linear]:
    """lora_A = nn.Linear(in, r) with nn.Linear's default init (Kaiming uniform, a = sqrt(5)) and
    lora_B = nn.Linear(r, out) initialised to zero, as PEFT makes them."""
    lora_A = nn.Linear(in_features, r, bias=False, device=device)
    lora_B = nn.Linear(r, out_features, bias=False, device=device)
    nn.init.kaiming_uniform_(lora_A.weight, a=math.sqrt(5))
    nn.init.zeros_(lora_B.weight)
    return lora_A, lora_B


def init_expert_A(A_ErI: torch.Tensor) -> None:
    """Each expert's A as a fresh nn.Linear(I, r) would be (Kaiming uniform, a = sqrt(5))."""
    for e in range(A_ErI.shape[0]):
        nn.init.kaiming_uniform_(A_ErI.data[e], a=math.sqrt(5))


@register_layer
class LoRALinear(AdapterLayer):
    """Plain LoRA (arXiv 2106.09685): delta = (lora_alpha / r) * B A dropout(x). A is initialised as
    nn.Linear's default (Kaiming uniform, a = sqrt(5)), B to zero, as PEFT does."""

    config_class = LoRAConfig

    def __init__(self, base_layer: nn.Linear, cfg: LoRAConfig, index: int = 0):
        super().__init__(base_layer, cfg, index)
        self.lora_A, self.lora_B = lora_pair(self.in_features, cfg.r, self.out_features, self.device)

    def delta(self, x_TI: torch.Tensor) -> torch.Tensor:
        return self.lora_B(self.lora_A(self.lora_dropout(x_TI))) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling


class RoutedMixin:
    """What MixLoRA and SMoRA share: a moekit router over the layer input, its weighted aux losses and
    the step counts its stateful updates (selection bias, k schedules) read once per optimiser step.

    The router is built and used only through its public surface: `router_class(kind)(cfg, d, E)`,
    `router(x_TD)` -> RouterOutput, its balance and aux-loss methods, and `after_optimizer_step(StepCounts)`.
    """

    router: nn.Module
    cfg: _RoutedConfig

    def _build_router(self, cfg: _RoutedConfig, d_model: int, num_experts: int, device) -> nn.Module:
        router = router_class(cfg.router.kind)(cfg.router, d_model, num_experts).to(device)
        if not cfg.router.is_causal() and not cfg.router.accepts_causal_leak():
            raise UsageError(f"{type(cfg).__name__}.router.kind={cfg.router.kind!r} is not causal (a token's experts "
                             "depend on later tokens), so a causal LM would see the future; set "
                             "allow_causal_leak=True in its RouterConfig to use it anyway")
        self.register_buffer("step_counts_E", torch.zeros(num_experts, dtype=torch.int64, device=device),
                             persistent=False)
        self.step_tokens = 0
        return router

    def _route(self, x_TI: torch.Tensor):
        route = self.router(x_TI)
        if self.training and torch.is_grad_enabled():
            # Every choice runs (adapters drop nothing), so executed and chosen counts are the same.
            self.step_counts_E += torch.bincount(route.expert_idx_N, minlength=self.step_counts_E.numel())
            self.step_tokens += route.num_tokens
        self.aux = self._router_losses(route) if torch.is_grad_enabled() else {}
        return route

    def _router_losses(self, route) -> dict[str, torch.Tensor]:
        """Unscaled losses over the T rows: the Switch balance loss (f and P as the router defines them
        for balancing: `balance_assignment`, `balance_probs`), the z-loss, and the router's own losses."""
        E = route.scores_TE.shape[1]
        _, expert_idx_N = self.router.balance_assignment(route, None)
        counts_E = torch.bincount(expert_idx_N, minlength=E)
        aux = {"load_balance": losses.load_balance_loss(self.router.balance_probs(route), counts_E, route.num_tokens),
               "z_loss": losses.z_loss(route.logits_TE)}
        aux.update(self.router.aux_losses(route, None))  # router-specific rules take precedence
        return aux

    def aux_loss(self) -> torch.Tensor | None:
        if not self.aux:
            return None
        cfg = self.cfg
        total = cfg.load_balance_coef * self.aux["load_balance"] + cfg.z_loss_coef * self.aux["z_loss"]
        for name, value in self.aux.items():
            if name not in ("load_balance", "z_loss"):
                total = total + cfg.router_aux_coef * value
        return total

    def after_optimizer_step(self) -> None:
        # NOTE: the one call into the router's stateful API (aux-loss-free bias, k schedules).
        counts_E = self.step_counts_E.clone()
        self.router.after_optimizer_step(StepCounts(executed_E=counts_E, chosen_E=counts_E, tokens=self.step_tokens))
        self.step_counts_E.zero_()
        self.step_tokens = 0
