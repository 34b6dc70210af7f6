"""Inference-time routing overrides on a built model, undone on `with` exit (or `.restore()`).

    with moekit.route(model, p=0.3):                 # every MoE layer
    with moekit.route(model, layers=[0, 1], k=1):    # chosen layers (indices in module order)
    with moekit.route(model, k=[4, 3, 2, 1]):        # one value per selected layer
    with moekit.route(model, kind="topp", p=0.5):    # another selection rule, same gate weights

Each field is a field of the (new) kind's router config. The new config is validated before anything
changes. A new `kind` converts the config (`RouterConfig.convert`: the fields both kinds have keep
their values) and builds that router around the *same* gate Parameter (`Router.adopt`: the selection
bias too), so no weight is copied or modified; the old router module is put back on exit, even after
an exception. Routers that carry a routing state across layers (RMoE) cannot be swapped with others.

Like `torch.set_grad_enabled`, the change is made when `route` is called: without `with` it stays
until the returned handle's `.restore()` (it used to do nothing at all without `with`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

from torch import nn

from moekit.config import router_fields
from moekit.errors import UsageError
from moekit.layers.moe import MoELayer, moe_layers  # moe_layers: also importable from here, where it was
from moekit.routers import router_class
from moekit.utils.scoped import Refused, applied_now


def _per_layer(value, n: int, name: str) -> list:
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != n:
            raise ValueError(f"route({name}=...): got {len(value)} values for {n} selected MoE layers")
        return list(value)
    return [value] * n


@applied_now
def route(model: nn.Module, layers: Sequence[int] | None = None, **changes) -> Iterator[list[MoELayer]]:
    """Change the routing rule of the chosen MoE layers (all by default); returns an `Applied` handle
    whose `with` value is the list of changed MoELayers.

    `changes` are RouterConfig fields (one value, or one per chosen layer), `kind` included.
    Raises ValueError (before anything changes) for a model without MoE layers, a layer index out of
    range, an unknown field, or a value the new router config refuses.
    """
    all_layers = moe_layers(model)
    if not all_layers:
        raise ValueError(f"route(): {type(model).__name__} contains no MoELayer")
    chosen = list(range(len(all_layers))) if layers is None else list(layers)
    for i in chosen:
        if not 0 <= i < len(all_layers):
            raise ValueError(f"route(layers=...): layer {i} is out of range; the model has {len(all_layers)} MoE layers")
    fields = router_fields()
    unknown = sorted(set(changes) - set(fields))
    if unknown:
        raise ValueError(f"route(): unknown RouterConfig fields {unknown}; allowed: {sorted(fields)}")
    values = {name: _per_layer(v, len(chosen), name) for name, v in changes.items()}

    # Build (and validate) every replacement before touching the model.
    plans = []
    for j, i in enumerate(chosen):
        layer = all_layers[i]
        old_cfg = layer.router.cfg
        change = {n: v[j] for n, v in values.items()}
        kind = change.pop("kind", old_cfg.kind)
        try:
            new_cfg = old_cfg.convert(kind, **change)  # the same kind: its fields replaced
        except UsageError as e:
            raise ValueError(f"route(): {e}") from None
        if kind != old_cfg.kind and (old_cfg.carries_state() or new_cfg.carries_state()):
            raise ValueError(f"route(kind={kind!r}): a router that carries a routing state across layers reads that "
                             f"state, not the token, so {old_cfg.kind!r} cannot be swapped with {kind!r}; change "
                             "its own fields instead")
        if new_cfg.weighted_shared_slots() != old_cfg.weighted_shared_slots() or \
                (kind != old_cfg.kind and old_cfg.learned_weight_scale()):
            raise ValueError(f"route({', '.join(f'{k}={v!r}' for k, v in {'kind': kind, **change}.items())}): the "
                             f"layer's router ({old_cfg.describe()}) also weights its "
                             f"{old_cfg.weighted_shared_slots()} shared experts or scales its weights by a learned "
                             f"scalar, which router {kind!r} with these fields would drop; change its other fields")
        new_cfg.validate(layer.cfg.router_slots)
        if new_cfg.routes_on_token_ids() and not old_cfg.routes_on_token_ids() and not layer.receives_token_ids():
            raise ValueError(f"route(kind={kind!r}): MoE layer {i} ({type(layer).__name__}) gets no token ids from its "
                             f"model, which router {kind!r} routes on (a wrapped transformers block gets them only "
                             "where transformers passes them, as DeepSeek-V4's); choose a kind that routes on the gate")
        if kind == old_cfg.kind:  # the routers keep their state (a hash table): can they run the new fields?
            for router in layer.iteration_routers():
                try:
                    router.check_reroute(new_cfg)
                except UsageError as e:
                    raise ValueError(f"route(): {e}") from None
        plans.append((layer, new_cfg))

    # Every router of a layer changes: Chain-of-Experts layers have one per iteration.
    saved = [(layer, layer.iteration_routers(), [r.cfg for r in layer.iteration_routers()], layer.cfg)
             for layer, _ in plans]

    def undo() -> None:
        for layer, routers, router_cfgs, cfg in saved:
            layer.router, layer.cfg = routers[0], cfg
            for t, router in enumerate(routers[1:]):
                layer.chain_routers[t] = router
            for router, router_cfg in zip(routers, router_cfgs, strict=True):
                router.cfg = router_cfg

    try:
        for layer, new_cfg in plans:
            routers = layer.iteration_routers()
            if new_cfg.kind == layer.router.kind:
                for router in routers:
                    router.cfg = new_cfg  # routers read their cfg at every forward
            else:
                layer.router = _rebuild(routers[0], new_cfg)
                for t, router in enumerate(routers[1:]):
                    layer.chain_routers[t] = _rebuild(router, new_cfg)
            layer.cfg = dataclasses.replace(layer.cfg, router=new_cfg)
    except BaseException:
        undo()
        raise
    # What this call set: a later change still in force (another route, a mask on a router this call built) would be
    # undone, or this change put back after it, by restoring this one first.
    applied = [(i, layer, layer.iteration_routers(), [r.cfg for r in layer.iteration_routers()], layer.cfg,
                [r.expert_mask_E for r in layer.iteration_routers()], old_cfgs[0].kind != layer.router.kind)
               for i, (layer, _, old_cfgs, _) in zip(chosen, saved, strict=True)]
    yield [layer for layer, _ in plans]
    while (why := _later_change(applied)) is not None:
        yield Refused(f"moekit.route(...).restore(): {why}; restore the later change first")
    undo()  # only when the handle restores (utils/scoped.py: a dropped handle keeps the change)


def _later_change(applied) -> str | None:
    """Why restoring a route now would undo or outlive a change made after it, or None."""
    for i, layer, routers, router_cfgs, cfg, masks, rebuilt in applied:
        now = layer.iteration_routers()
        if (layer.cfg is not cfg or len(now) != len(routers) or any(a is not b for a, b in zip(now, routers, strict=True))
                or any(r.cfg is not c for r, c in zip(now, router_cfgs, strict=True))):
            return f"MoE layer {i} was re-routed again after this change, and that re-route is still in force"
        if rebuilt and any(r.expert_mask_E is not m for r, m in zip(now, masks, strict=True)):
            return (f"MoE layer {i}'s experts were masked (moekit.mask_experts) after this change of router kind, and "
                    "the mask is still in force on the router this change built")
    return None


def _rebuild(router: nn.Module, cfg) -> nn.Module:
    new = router_class(cfg.kind)(cfg, router.d_model, router.num_experts).to(router.weight.device)
    new.adopt(router)  # the same gate Parameter (and shared state): nothing is copied; a mask stays in force
    new.train(router.training)
    return new
