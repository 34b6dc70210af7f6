"""Sparse MoE experts inside a transformers decoder layer (Gemma 4, DiffusionGemma): no block to replace.

Legend: T tokens, D model dim, E experts, K experts per token.

The decoder layer itself calls its two MoE children, on different inputs, between its own norms and
beside its dense MLP (transformers' Gemma4TextDecoderLayer.forward):
    _, w_TK, idx_TK = self.router(residual_TD)                                   # Gemma4TextRouter
    y_TD = self.experts(self.pre_feedforward_layernorm_2(residual_TD), idx_TK, w_TK)   # Gemma4TextExperts
moekit wraps the two children, and everything else (the norms, the dense MLP, the sum) stays the
layer's own code:
  experts -> HFInlineMoE, an HFMoEBlock (so a MoELayer: routing_info, moekit.route, masks, traces and
             offload see a normal moekit MoE layer) read from a view of the two children
             (`MoEChildren`): moekit's router holds the HF router's gate `proj.weight`, its input norm
             (`RouterInputNorm`: RMS norm, times the HF `scale`, times D^-0.5) and its `per_expert_scale`
             (`expert_scale`); the ExpertBank holds `gate_up_proj` and `down_proj`. Nothing is copied.
             Its forward routes what the router child was last called with and runs the experts on its
             own input; it does not read the (None) indices and weights the layer passes it.
  router  -> InlineRouterCall: hands its input to the HFInlineMoE and returns (None, None, None).
state_dict keys stay transformers' (`layers.i.router.proj.weight`, `layers.i.router.scale`,
`layers.i.router.per_expert_scale`, `layers.i.experts.gate_up_proj`, ...), each resolves with
`get_parameter`, and `load_state_dict` takes them back (the router child loads the router's tensors: torch
hands each module only its own keys); `moekit.hf.unwrap` puts both HF modules back.
"""

from __future__ import annotations

import sys
import warnings

import torch
from torch import nn

from moekit.hf.block import _TRAINER_PARAMETER_NAMES, HFMoEBlock, _get_tensor, _set_tensor
from moekit.hf.detect import UnsupportedBlockError, _read_bank, _router_weight
from moekit.hf.private_api import active_collector
from moekit.layers.moe import MoELayer


class MoEChildren(nn.Module):
    """The router and experts children of a decoder layer as one module (a view: it holds the layer's own
    modules under their names there). Its forward is the layer's MoE part with one input for both:
    `experts(x, *reversed(router(x)[1:]))`, the reference the parity probe compares against."""

    def __init__(self, layer: nn.Module, router_name: str, experts_name: str):
        super().__init__()
        self.router_name, self.experts_name = router_name, experts_name
        self.add_module(router_name, getattr(layer, router_name))
        self.add_module(experts_name, getattr(layer, experts_name))
        self.training = layer.training  # not .train(): that would set the layer's children
        object.__setattr__(self, "layer", layer)  # not a submodule
        self.layer_class = type(layer).__name__
        # (the HFInlineMoE, what the router child was last called with), set by InlineRouterCall
        self.router_input = None

    def forward(self, hidden_states):
        x_TD = hidden_states.reshape(-1, hidden_states.shape[-1])
        _, w_TK, idx_TK = getattr(self, self.router_name)(x_TD)
        return getattr(self, self.experts_name)(x_TD, idx_TK, w_TK).view(hidden_states.shape)


def inline_children(layer: nn.Module) -> tuple[str, str] | None:
    """(router child name, experts child name) of a module that holds its sparse MoE's parts beside an
    attention child (a decoder layer running them itself, Gemma 4); None for anything else. The router is
    the one child with a gate (E, D) (see detect.py) whose call returns (probabilities, weights (T, K),
    indices (T, K)): a plain Linear(D, E) beside it (Gemma 4's per-layer input gate) is not one."""
    experts = getattr(layer, "experts", None)
    if isinstance(experts, MoELayer) or not isinstance(experts, nn.Module):
        return None
    if not any(type(c).__name__.endswith("Attention") for c in layer.children()):
        return None
    try:
        _, _, E, D, _, _ = _read_bank(experts, lambda why: UnsupportedBlockError(why))
    except UnsupportedBlockError:
        return None
    routers = [n for n, c in layer.named_children()
               if c is not experts and _router_weight(c, E, D) is not None and _returns_choice(c, D)]
    return (routers[0], "experts") if len(routers) == 1 else None


def _returns_choice(child: nn.Module, D: int) -> bool:
    """Whether `child` maps (T, D) to a triple whose last item is integer indices (a router's choice)."""
    if isinstance(child, nn.Linear):
        return False
    weight = next(child.parameters())
    try:
        with torch.no_grad():
            out = child(torch.zeros(2, D, device=weight.device, dtype=weight.dtype))
    except Exception:
        return False
    return isinstance(out, tuple) and len(out) == 3 and not out[2].dtype.is_floating_point


class HFInlineMoE(HFMoEBlock):
    """The experts child of a decoder layer whose MoE lives inside it (see the module doc); built by
    `moekit.hf.wrap` from a `MoEChildren` reading. `hf_class` names the decoder layer's class."""

    def __init__(self, spec, recorded_output: int | None = None):
        super().__init__(spec, recorded_output)
        view = spec.block
        self.hf_class = view.layer_class
        # HF names under the decoder layer: `experts.X` is this layer's X, `router.Y` the proxy's Y
        self._names_under = {view.experts_name: {}, view.router_name: {}}
        for mine, theirs in self._hf_names.items():
            head, _, rest = theirs.partition(".")
            self._names_under[head][rest] = mine
        for rest, mine in self._names_under[view.experts_name].items():
            if "." not in rest:
                self._hf_children.setdefault(rest, mine)  # get_parameter("layers.i.experts.gate_up_proj")
        self.register_state_dict_post_hook(_state_dict_to_layer_names)
        self.register_load_state_dict_pre_hook(_load_experts_names)

    def forward(self, hidden_states, top_k_index=None, top_k_weights=None, padding_mask=None):
        """The experts child's call: hidden states (T, D) (or (B, T, D)) -> the same shape. The router reads
        what the router child was last called with (InlineRouterCall), or, without such a call, this input;
        `top_k_index` and `top_k_weights` (what the layer got from the router child: None) are not read."""
        # Held by the view, which the reading a deferred probe verifies shares (moekit.hf.wrap's `_become`),
        # for this layer object: the probe's own layer, run between the two calls, does not take it.
        view, router_in = self._hf_block, None
        if view.router_input is not None and view.router_input[0] is self:
            router_in, view.router_input = view.router_input[1], None
        collected = active_collector.get() if self.records_router_logits else None
        if collected is None or "router_logits" not in collected:
            return MoELayer.forward(self, hidden_states, padding_mask, router_input=router_in)
        # `output_router_logits=True`: transformers records the HF router's first output, its (T, E)
        # probabilities (fp32 in Gemma 4) (OutputRecorder(Gemma4TextRouter, index=0)), with their gradient.
        probs = []
        handle = self.router.register_forward_hook(lambda _m, _a, route: probs.append(route.scores_TE))
        try:
            y = MoELayer.forward(self, hidden_states, padding_mask, router_input=router_in)
        finally:
            handle.remove()
        collected["router_logits"].append(self.as_router_dtype(probs[0], self._recorded_dtype))
        return y

    def named_children(self):
        """torch's. The HF names of this layer are the decoder layer's `router.*` and `experts.<leaf>`: leaves that
        transformers' Trainer walk (`get_parameter_names`) reads from this module's own `_parameters` only, so no
        name tree answers it (see docs/hf.md); that walk gets a warning that the Trainer's weight-decay group
        misses this layer's router and expert weights."""
        if sys._getframe(1).f_code is _TRAINER_PARAMETER_NAMES:
            warnings.warn(f"moekit.hf: transformers' Trainer puts the router and expert weights of the wrapped "
                          f"{self.hf_class} layers in its no-decay group (their HF names sit on the decoder layer); "
                          "pass the optimizer groups yourself (named_parameters() gives the HF names) or "
                          "moekit.hf.unwrap(model) to train with weight decay on them", UserWarning, stacklevel=3)
        return nn.Module.named_children(self)

    def _hf_names_prefix(self, prefix: str) -> str:
        """The decoder layer's prefix, as `_state_dict_to_layer_names` names the keys (`layers.i.router.proj.weight`)."""
        name = self._hf_block.experts_name
        if prefix == name:
            return ""
        return prefix[: -len(name) - 1] if prefix.endswith(f".{name}") else prefix

    def original(self) -> nn.Module:
        """The HF experts module (every tensor this layer holds put back into the HF router and experts)."""
        view = super().original()
        return getattr(view, view.experts_name)

    def original_router(self) -> nn.Module:
        """The HF router module (every tensor this layer holds put back, as `original`)."""
        view = super().original()
        return getattr(view, view.router_name)

    def hf_modules(self) -> list[nn.Module]:
        """The HF modules this layer stands for (transformers' init re-initialises them)."""
        return [self.original_router(), self.original()]


class InlineRouterCall(nn.Module):
    """The router child of a decoder layer whose experts child is an HFInlineMoE: its call hands the input
    to that layer (which routes it with moekit's router) and returns (None, None, None) for the layer to
    pass on. The HF router's names (`proj.weight`, `scale`, `per_expert_scale`) read and set the
    HFInlineMoE's tensors; `original()` is the HF router."""

    def __init__(self, moe: HFInlineMoE):
        super().__init__()
        object.__setattr__(self, "_moe", moe)  # not a submodule: its tensors are saved once, by the experts child
        self.register_load_state_dict_pre_hook(_load_router_names)

    def forward(self, hidden_states, *args, **kwargs):
        self._moe._hf_block.router_input = (self._moe, hidden_states)
        return None, None, None

    def original(self) -> nn.Module:
        return self._moe.original_router()

    def _hf_name(self, name: str):
        """(moekit name, is a tensor) of the HF router's attribute `name`, or None."""
        moe = self.__dict__.get("_moe")
        if moe is None:
            return None
        under = moe._names_under[moe._hf_block.router_name]
        if name in under:
            return under[name], True
        for rest, mine in under.items():  # `proj`: the module holding the gate weight under the same leaf name
            owner, _, leaf = rest.rpartition(".")
            if owner == name and mine.rpartition(".")[2] == leaf:
                return mine.rpartition(".")[0], False
        return None

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            found = self._hf_name(name)
            if found is None:
                raise
            mine, is_tensor = found
            return _get_tensor(self._moe, mine) if is_tensor else self._moe.get_submodule(mine)

    def __setattr__(self, name: str, value) -> None:
        found = self._hf_name(name) if not name.startswith("_") else None
        if found is not None and found[1]:  # transformers' loading, functional_call: set moekit's tensor
            owner, _, leaf = found[0].rpartition(".")
            _set_tensor(self._moe.get_submodule(owner), leaf, value)
            return
        super().__setattr__(name, value)

    def extra_repr(self) -> str:
        return f"routes for {self._moe.hf_class}'s experts child (moekit)"


def proxy_pairs(name: str, layer: nn.Module, moe: HFInlineMoE) -> list[tuple[str, nn.Module]]:
    """(module name, new module) for the two children of the decoder layer `layer` at `name`."""
    view = moe._hf_block
    prefix = f"{name}." if name else ""
    return [(prefix + view.router_name, InlineRouterCall(moe)), (prefix + view.experts_name, moe)]


def _state_dict_to_layer_names(module: HFInlineMoE, state_dict, prefix: str, local_metadata) -> None:
    """After HFMoEBlock's renaming (view names under this layer's prefix): the decoder layer's names."""
    view = module._hf_block
    if not prefix.endswith(f"{view.experts_name}."):
        return  # the layer's own state_dict(): the view's names
    parent = prefix[: -len(view.experts_name) - 1]
    for theirs in module._hf_order:
        if prefix + theirs in state_dict:
            state_dict[parent + theirs] = state_dict.pop(prefix + theirs)


def _load_router_names(proxy: InlineRouterCall, state_dict, prefix: str, local_metadata, *args) -> None:
    """load_state_dict pre-hook of the router child: torch hands each module only the keys under its own
    prefix, so the HF router's tensors (`proj.weight`, `scale`, `per_expert_scale`) are loaded here, into
    the HFInlineMoE's tensors (which that layer then keeps, see `_load_experts_names`); copied, or
    assigned under `load_state_dict(..., assign=True)`."""
    moe = proxy._moe
    assign = local_metadata.get("assign_to_params_buffers", False)
    for rest, mine in moe._names_under[moe._hf_block.router_name].items():
        if prefix + rest not in state_dict:
            continue
        value, tensor = state_dict.pop(prefix + rest), _get_tensor(moe, mine)
        if assign:
            owner, _, leaf = mine.rpartition(".")
            new = nn.Parameter(value, requires_grad=tensor.requires_grad) if isinstance(tensor, nn.Parameter) else value
            setattr(moe.get_submodule(owner), leaf, new)
        else:
            with torch.no_grad():
                tensor.copy_(value)


def _load_experts_names(moe: HFInlineMoE, state_dict, prefix: str, *args) -> None:
    """load_state_dict pre-hook of the experts child: its HF names (`gate_up_proj`) become moekit's
    (`experts.gate_up_proj`); the router's tensors, loaded by the router child, keep their values."""
    view = moe._hf_block
    for rest, mine in moe._names_under[view.experts_name].items():
        if prefix + rest in state_dict and rest != mine:
            state_dict[prefix + mine] = state_dict.pop(prefix + rest)
    for mine in moe._names_under[view.router_name].values():
        state_dict.setdefault(prefix + mine, _get_tensor(moe, mine).detach())
