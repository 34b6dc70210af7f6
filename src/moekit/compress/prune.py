"""Router-aware expert pruning: remove whole routed experts, with their router rows, layer by layer.

Legend: L MoE layers, E experts of a layer, D model dim.

Criteria (scores per (layer, expert) from a `Calibration`; the lowest go):
  freq   executed assignments (frequency)
  reap   REAP saliency: mean over routed tokens of router weight x ||expert output||
         (CerebrasResearch/reap, pruning_metrics.py)
  task   PreMoe (arXiv 2505.17639): keep the experts the task's text selects, by the expected
         router probability over the task's calibration tokens (calibrate on the task's text only)

Budgets: `per_layer=False` removes the same share of every layer; `per_layer=True` ranks every
(layer, expert) of the model at once, each layer's scores divided by their sum so that layers are
comparable, so layers keep different expert counts (each at least what its router needs: k for
top-k; with group-limited routing a whole number of experts per group, chosen within each group so
the groups keep their meaning).

What pruning changes in a kept token's output (documented, and tested): the router scores over the
surviving experts only. Renormalised top-k weights (softmax or sigmoid with normalize=True) are then
unchanged for a token whose k experts all survive, so its output is identical. Raw softmax weights
(normalize=False, Switch-style) grow to p_e / (sum of the surviving p): that token's routed output is
its old output divided by the surviving probability mass. Top-p and other dynamic rules may also
select a different set (the threshold is applied to the renormalised probabilities).

The result is an ordinary moekit model with fewer experts per layer: `LMConfig.moe_num_experts`
records each layer's count (saved with the model), and the model trains, evaluates, traces and
offloads as any other.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from moekit.compress.calibrate import Calibration
from moekit.errors import UsageError
from moekit.experts import ExpertBank
from moekit.layers.moe import MoELayer, moe_layers
from moekit.routers import router_class

__all__ = ["CRITERIA", "PruneResult", "apply_keep", "choose_experts", "expert_scores", "min_experts", "prune"]

CRITERIA = ("freq", "reap", "task")


@dataclass
class PruneResult:
    """Which experts each MoE layer kept (original ids, ascending), of how many."""

    kept: list[list[int]]
    before: list[int]
    criterion: str

    def summary(self) -> str:
        removed = sum(self.before) - sum(map(len, self.kept))
        touched = sum(len(k) < e for k, e in zip(self.kept, self.before, strict=True))
        return (f"pruned {removed} of {sum(self.before)} experts in {touched} of {len(self.before)} layers "
                f"(by {self.criterion}; experts per layer now {' '.join(str(len(k)) for k in self.kept)})")

    def to_dict(self) -> dict:
        return {"method": "prune", "criterion": self.criterion, "before": self.before, "kept": self.kept}


def expert_scores(calib: Calibration, criterion: str) -> list[torch.Tensor]:
    """Per layer, a score per expert (higher = keep): see the module doc."""
    if criterion == "freq":
        return [s.frequency_E() for s in calib.layers]
    if criterion == "reap":
        return [s.reap_E() for s in calib.layers]
    if criterion == "task":
        return [s.expected_score_E() for s in calib.layers]
    raise UsageError(f"--criterion {criterion!r} is invalid; allowed: {', '.join(CRITERIA)}")


def _groups(layer: MoELayer) -> int:
    # Group-limited routing (DeepSeek-V3) needs the same number of experts in every group.
    return layer.cfg.router.expert_groups()


def min_experts(layer: MoELayer) -> int:
    """The fewest experts the layer's router accepts (its config validates), a multiple of its groups."""
    g = _groups(layer)
    for E in range(g, layer.router.num_experts + 1, g):
        try:
            layer.cfg.router.validate(E)
            return E
        except ValueError:
            continue
    return layer.router.num_experts


def _top(scores: torch.Tensor, n: int, g: int) -> list[int]:
    """The n best of `scores`, n / g of them from each of g contiguous groups."""
    E = scores.numel()
    per = E // g
    keep = []
    for j in range(g):
        order = torch.argsort(scores[j * per:(j + 1) * per], descending=True, stable=True)
        keep += (order[: n // g] + j * per).tolist()
    return sorted(keep)


def choose_experts(model: nn.Module, scores: list[torch.Tensor], ratio: float, per_layer: bool = False) -> list[list[int]]:
    """The experts each MoE layer keeps when a share `ratio` in [0, 1) of the experts goes (see the module doc)."""
    layers = moe_layers(model)
    if not 0 <= ratio < 1:
        raise UsageError(f"--prune {ratio} is invalid; allowed: a share of experts to remove in [0, 1)")
    if len(scores) != len(layers):
        raise ValueError(f"prune: {len(scores)} layers of scores for a model of {len(layers)} MoE layers")
    E_L = [m.router.num_experts for m in layers]
    floor_L = [min_experts(m) for m in layers]
    g_L = [_groups(m) for m in layers]
    if not per_layer:
        n_L = [max(f, round(E * (1 - ratio)) // g * g) for E, f, g in zip(E_L, floor_L, g_L, strict=True)]
    else:
        total = round(sum(E_L) * (1 - ratio))
        share = [s.double() / s.double().sum().clamp(min=1e-30) for s in scores]
        # One ranking over every (layer, expert): each layer first gets its floor, then the best of the rest.
        n_L = list(floor_L)
        ranked = sorted(((float(v), i, e) for i, s in enumerate(share) for e, v in enumerate(s.tolist())), reverse=True)
        taken = [set(_top(share[i], floor_L[i], g_L[i])) for i in range(len(layers))]
        budget = total - sum(n_L)
        for _, i, e in ranked:
            if budget <= 0:
                break
            if e in taken[i]:
                continue
            taken[i].add(e)
            budget -= 1
        # With groups, round each layer's count down to whole groups (never under its floor).
        n_L = [max(f, len(t) // g * g) for t, f, g in zip(taken, floor_L, g_L, strict=True)]
    return [_top(s, n, g) for s, n, g in zip(scores, n_L, g_L, strict=True)]


def _select_experts(bank: ExpertBank, idx: torch.Tensor) -> ExpertBank:
    """A bank of the experts `idx` of `bank`, in the same layout, activation, dtype and device (copies)."""
    new = ExpertBank(idx.numel(), bank.d_model, bank.d_expert, bank.act, bank.layout).to(bank.down_proj)
    for name, w in bank.named_parameters(recurse=False):
        rows = w.view(bank.num_experts, -1, w.shape[-1]) if bank.layout.flat else w  # flat: (E * F, D) stacks
        kept = rows.index_select(0, idx)
        getattr(new, name).copy_(kept.reshape(-1, w.shape[-1]) if bank.layout.flat else kept)
        getattr(new, name).requires_grad_(w.requires_grad)
    return new


@torch.no_grad()
def apply_keep(layer: MoELayer, keep: list[int]) -> None:
    """Keep only the experts `keep` (ascending original ids) in `layer`: its bank, its router's per-expert
    rows (`Router.expert_tensors`, e.g. the gate rows and a selection bias) and any expert mask. A wrapped
    transformers block (moekit.hf) is pruned the same way; its saved form is `moekit.compress.save_hf`'s."""
    if isinstance(layer.experts, ExpertBank):
        layer.experts.require_standard("prune")
    if layer.expert_map_E is not None:
        raise UsageError("prune: this layer's experts were merged (expert_map_E); prune before merging")
    if not isinstance(layer.experts, ExpertBank):
        raise UsageError(f"prune: the experts are a {type(layer.experts).__name__}; prune before quantising")
    E = layer.router.num_experts
    if keep == list(range(E)):
        return
    idx = torch.tensor(keep, dtype=torch.long, device=layer.router.weight.device)
    cfg = dataclasses.replace(layer.cfg, num_experts=len(keep))
    cfg.validate()
    old = layer.router
    state = old.state_dict()
    for name in type(old).expert_tensors:
        if name in state:
            state[name] = state[name].index_select(0, idx)
    with torch.device(old.weight.device):
        router = router_class(cfg.router.kind)(cfg.router, cfg.d_model, len(keep))
        if "bias" in state and getattr(router, "bias", None) is None:  # a router logit bias (E,), wrapped models
            router.bias = nn.Parameter(torch.empty(len(keep)))
        if old.expert_scale is not None:  # a pretrained per-expert weight scale (E,) and input norm (Gemma 4)
            router.expert_scale = nn.Parameter(torch.empty(len(keep)))
        router.input_norm = old.input_norm
        for name, buf in old._buffers.items():
            if buf is None and router._buffers.get(name) is not None:
                setattr(router, name, None)  # one the old router holds none of (a dropped selection bias): none here
    if "bias" in state:
        state["bias"] = state["bias"].index_select(0, idx)
    router.load_state_dict(state)
    router.to(dtype=old.weight.dtype).train(old.training)
    router.weight.requires_grad_(old.weight.requires_grad)
    if old.expert_mask_E is not None:
        router.expert_mask_E = old.expert_mask_E.index_select(0, idx)
    layer.router, layer.experts, layer.cfg = router, _select_experts(layer.experts, idx), cfg


def prune(model: nn.Module, calib: Calibration, ratio: float, criterion: str = "reap",
          per_layer: bool = False) -> PruneResult:
    """Remove a share `ratio` of the routed experts of `model`, in place, by `criterion` scored on `calib`
    (see the module doc). A moekit MoELM gets `cfg.moe_num_experts`. Returns what was kept."""
    layers = moe_layers(model)
    for layer in layers:  # before any layer changes
        if isinstance(layer.experts, ExpertBank):
            layer.experts.require_standard("prune")
    scores = expert_scores(calib, criterion)
    kept = choose_experts(model, scores, ratio, per_layer)
    before = [m.router.num_experts for m in layers]
    for layer, keep in zip(layers, kept, strict=True):
        apply_keep(layer, keep)
    record_counts(model)
    return PruneResult(kept, before, criterion)


def record_counts(model: nn.Module) -> None:
    """Write each MoE layer's router expert count into a MoELM's config (`LMConfig.moe_num_experts`)."""
    cfg = getattr(model, "cfg", None)
    if cfg is None or not hasattr(cfg, "moe_num_experts"):
        return
    counts = [m.router.num_experts for m in moe_layers(model)]
    if len(set(counts)) == 1:  # one count for every layer: an ordinary config (exports to transformers)
        cfg.moe = dataclasses.replace(cfg.moe, num_experts=counts[0])
        cfg.moe_num_experts = None
    else:
        cfg.moe_num_experts = counts
