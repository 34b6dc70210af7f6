"""Expert masks: switch routed experts off, or force them on, at inference time; undone on `with` exit.

Mixture of Tunable Experts (MoTE, Dahlke et al., arXiv 2502.11096) steers a pretrained MoE model by
deactivating (or force-activating) a handful of routed experts, with no training:

    with moekit.mask_experts(model, disabled={0: [3, 7], 5: [1]}):     # MoE layer -> expert ids
        model(ids)
    with moekit.mask_experts(model, forced={2: [4]}):
        model(ids)

Keys are MoE-layer indices in module order, as in `moekit.route(layers=...)` (for a model whose
first decoder layers are dense, such as DeepSeek-V3, MoE layer 0 is the first *sparse* layer).
Values are expert ids in [0, E). Works on moekit models and on `moekit.hf.wrap`-ped models.

The rule (MoTE, arXiv 2502.11096), applied by the routers (`Router.expert_mask_E`):
  * disabled: the expert's router logit is -inf before selection, so its probability is 0, it is
    never selected and never runs. With softmax scores the other experts' probabilities are
    renormalised over the experts left (this changes the combine weights of families that do not
    renormalise the top-k, e.g. OLMoE). Pruning an expert at inference time is disabling it: the
    weights stay in place, untouched.
  * forced: the expert's *selection* score is +inf, so it takes one of the token's k slots (top-k:
    Mixtral, OLMoE, Qwen, DeepSeek; null experts), or joins every token's prefix (top-p); its combine
    weight is still its own (unforced) score. Routers whose rule cannot rank experts so refuse it
    (each router config says which masks it honours: `RouterConfig.check_expert_mask`).
  * routers with a selection bias (DeepSeek-V3's e_score_correction_bias) get both on the *biased*
    scores, so a bias cannot bring a disabled expert back.
No weight is copied or modified. Masks nest: an inner block adds to the outer one and wins where both
name the same expert. A `moekit.route(kind=...)` entered *inside* a mask builds a router without the
mask, so enter the mask inside the route override.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

import torch
from torch import nn

from moekit.layers.moe import MoELayer
from moekit.layers.overrides import moe_layers
from moekit.routers import Router
from moekit.utils.scoped import Refused, applied_now

ExpertIds = Mapping[int, Iterable[int]]

_FREE, _DISABLED, _FORCED = 0, -1, 1


@applied_now
def mask_experts(model: nn.Module, disabled: ExpertIds | None = None,
                 forced: ExpertIds | None = None) -> Iterator[list[MoELayer]]:
    """Disable / force routed experts of chosen MoE layers, from the call until `with` exits (or the
    returned handle's `.restore()`, when called without `with`, as `torch.set_grad_enabled`).

    The `with` value is the list of masked MoELayers. Everything is validated before any router changes; the previous
    masks come back on exit, even after an exception, and with `.restore()`; a handle dropped without either keeps
    the masks (from now on).
    """
    all_layers = moe_layers(model)
    if not all_layers:
        raise ValueError(f"mask_experts(): {type(model).__name__} contains no MoELayer "
                         "(wrap a transformers model with moekit.hf.wrap first)")
    disabled, forced = _by_layer(disabled, "disabled", all_layers), _by_layer(forced, "forced", all_layers)

    plans = []
    for i in sorted(set(disabled) | set(forced)):
        layer = all_layers[i]
        router = layer.router
        off, on = disabled.get(i, set()), forced.get(i, set())
        both = sorted(off & on)
        if both:
            raise ValueError(f"mask_experts(): layer {i}: experts {both} are both disabled and forced")
        mask_E = (router.expert_mask_E.clone() if router.expert_mask_E is not None
                  else torch.zeros(router.num_experts, dtype=torch.int8, device=router.weight.device))
        mask_E[sorted(off)] = _DISABLED
        mask_E[sorted(on)] = _FORCED
        _check(i, router, mask_E)
        # Chain-of-Experts: every iteration's router gets the mask (a disabled expert runs in no iteration).
        plans.extend((r, mask_E) for r in layer.iteration_routers())

    saved = [(router, router.expert_mask_E) for router, _ in plans]
    for router, mask_E in plans:  # plain assignments of validated masks: nothing here fails part-way
        router.expert_mask_E = mask_E
    yield [all_layers[i] for i in sorted(set(disabled) | set(forced))]
    # A later change still in force: restoring this one first would undo it (a later mask) or leave this mask in
    # force on the router a later moekit.route(kind=...) built around the masked one.
    while (why := _later_change(all_layers, plans)) is not None:
        yield Refused(f"moekit.mask_experts(...).restore(): {why}; restore the later change first")
    for router, old in saved:  # only when the handle restores (utils/scoped.py: a dropped handle keeps the masks)
        router.expert_mask_E = old


def _later_change(layers: list[MoELayer], plans) -> str | None:
    """Why restoring a mask now would undo or outlive a change made after it, or None."""
    routing = {id(r): i for i, layer in enumerate(layers) for r in layer.iteration_routers()}
    for router, mask_E in plans:
        if id(router) not in routing:
            return "the router of a masked layer was replaced after this mask (moekit.route(kind=...)), and the " \
                   "replacement is still in force"
        if router.expert_mask_E is not mask_E:
            return f"MoE layer {routing[id(router)]} was masked again after this mask, and that mask is still in force"
    return None


def _by_layer(ids: ExpertIds | None, name: str, layers: list[MoELayer]) -> dict[int, set[int]]:
    if ids is None:
        return {}
    if not isinstance(ids, Mapping):
        raise ValueError(f"mask_experts({name}=...): expected a mapping {{MoE layer index: [expert ids]}}, "
                         f"got {type(ids).__name__}")
    out: dict[int, set[int]] = {}
    for i, experts in ids.items():
        if not isinstance(i, int) or not 0 <= i < len(layers):
            raise ValueError(f"mask_experts({name}=...): layer {i!r} is out of range; the model has "
                             f"{len(layers)} MoE layers (indices 0..{len(layers) - 1})")
        E = layers[i].cfg.num_experts
        chosen = {int(e) for e in experts}
        bad = sorted(e for e in chosen if not 0 <= e < E)
        if bad:
            raise ValueError(f"mask_experts({name}=...): layer {i}: expert ids {bad} are out of range; "
                             f"allowed: 0..{E - 1}")
        out[i] = chosen
    return out


def _check(i: int, router: Router, mask_E: torch.Tensor) -> None:
    """Refuse masks a router cannot honour, rather than let it pick a disabled expert or drop a forced one."""
    cfg = router.cfg
    try:
        cfg.check_expert_mask(mask_E)
    except ValueError as e:
        what = "forced=..." if bool((mask_E == _FORCED).any()) else "..."
        raise ValueError(f"mask_experts({what}): layer {i}: {e}") from None
    # Experts a token must be able to get: the rule's fixed count (top-k), its minimum (top-p), or the
    # real picks a null-expert router cannot send to null experts.
    need = max(cfg.min_enabled_experts(), 1)
    enabled = router.num_experts - int((mask_E == _DISABLED).sum())
    if enabled < need:
        raise ValueError(f"mask_experts(disabled=...): layer {i} would keep {enabled} enabled experts, but router "
                         f"{cfg.kind!r} ({cfg.describe()}) needs at least {need}")
