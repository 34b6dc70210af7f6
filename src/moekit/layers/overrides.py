"""Inference-time routing overrides on a built model, undone on exit.

    with moekit.route(model, p=0.3):                 # every MoE layer
    with moekit.route(model, layers=[0, 1], k=1):    # chosen layers (indices in module order)
    with moekit.route(model, k=[4, 3, 2, 1]):        # one value per selected layer
    with moekit.route(model, kind="topp", p=0.5):    # another selection rule, same gate weights

Each field is a RouterConfig field. The new config is validated before anything changes. A new
`kind` builds that router around the *same* gate Parameter (and selection bias), so no weight is
copied or modified; the old router module is put back on exit, even after an exception.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence

from torch import nn

from moekit.layers.moe import MoELayer, moe_layers  # moe_layers: also importable from here, where it was
from moekit.routers import router_class


def _per_layer(value, n: int, name: str) -> list:
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != n:
            raise ValueError(f"route({name}=...): got {len(value)} values for {n} selected MoE layers")
        return list(value)
    return [value] * n


@contextlib.contextmanager
def route(model: nn.Module, layers: Sequence[int] | None = None, **changes) -> Iterator[list[MoELayer]]:
    all_layers = moe_layers(model)
    if not all_layers:
        raise ValueError(f"route(): {type(model).__name__} contains no MoELayer")
    chosen = list(range(len(all_layers))) if layers is None else list(layers)
    for i in chosen:
        if not 0 <= i < len(all_layers):
            raise ValueError(f"route(layers=...): layer {i} is out of range; the model has {len(all_layers)} MoE layers")
    fields = {f.name for f in dataclasses.fields(all_layers[0].cfg.router)}
    unknown = sorted(set(changes) - fields)
    if unknown:
        raise ValueError(f"route(): unknown RouterConfig fields {unknown}; allowed: {sorted(fields)}")
    values = {name: _per_layer(v, len(chosen), name) for name, v in changes.items()}

    # Build (and validate) every replacement before touching the model.
    plans = []
    for j, i in enumerate(chosen):
        layer = all_layers[i]
        new_cfg = dataclasses.replace(layer.router.cfg, **{n: v[j] for n, v in values.items()})
        if new_cfg.kind != layer.router.kind and "recurrent" in (new_cfg.kind, layer.router.kind):
            raise ValueError(f"route(kind={new_cfg.kind!r}): a recurrent router's gate reads the GRU state, not the "
                             f"token, so it cannot be swapped with {layer.router.kind!r}; change select_rule instead")
        new_cfg.validate(layer.cfg.num_experts)
        plans.append((layer, new_cfg))

    saved = [(layer, layer.router, layer.router.cfg, layer.cfg) for layer, _ in plans]
    try:
        for layer, new_cfg in plans:
            if new_cfg.kind == layer.router.kind:
                layer.router.cfg = new_cfg  # routers read their cfg at every forward
            else:
                layer.router = _rebuild(layer.router, new_cfg)
            layer.cfg = dataclasses.replace(layer.cfg, router=new_cfg)
        yield [layer for layer, _ in plans]
    finally:
        for layer, router, router_cfg, cfg in saved:
            layer.router, layer.cfg = router, cfg
            router.cfg = router_cfg


def _rebuild(router: nn.Module, cfg) -> nn.Module:
    cls = router_class(cfg.kind)
    new = cls(cfg, router.d_model, router.num_experts).to(router.weight.device)
    new.weight = router.weight  # share the gate Parameter: nothing is copied
    if hasattr(new, "reset_null_rows"):
        new.reset_null_rows()  # AdaMoE: null rows start as tiles of the *shared* (e.g. pretrained) gate rows
    new.expert_mask_E = router.expert_mask_E  # a mask entered outside the override stays in force
    if hasattr(router, "e_score_correction_bias") and hasattr(new, "e_score_correction_bias"):
        new.e_score_correction_bias = router.e_score_correction_bias
    new.train(router.training)
    return new
