"""The one next-layer expert prediction rule, used by analysis (gate look-ahead, prefetch recall)
and offload (predictive prefetch).

Legend: T tokens, D model dim, E experts, K predicted experts per token (padded with -1).

Rule: to predict which experts layer j+d runs for a token, apply layer j+d's own router - its gate
and its own selection rule (top-k with its selection bias and group limit, top-p, null experts,
expert masks, the random router's k, expert choice over the given tokens) - to the hidden state the
token has at layer j, without gradient and without any state update, and take the experts it
picks. This generalises the gate look-ahead of mixtral-offloading, Fate and AdapMoE ("top-k of the
next gate's logits") so that every router is predicted by the rule it routes with; on the layer's
own input the prediction equals the layer's choice (tested). Null-expert picks (AdaMoE) never
appear: they have no weights to load. The router runs in its current mode, as the layer would
(eval: no jitter; the random router's inference k).

Routers that cannot predict from a token: those that carry a routing state across layers
(`RouterConfig.carries_state()`, e.g. RMoE, arXiv 2408.06793, whose logits read a GRU state) - that
state does not exist before the layers in between have run. `can_predict` is False for them and
`predict_route` raises; callers record no prediction for such a layer.
"""

from __future__ import annotations

import dataclasses

import torch

from moekit.routers.base import Router, RouterOutput

__all__ = ["can_predict", "predict_experts", "predict_route", "priority_order"]


def can_predict(router: Router) -> bool:
    """Whether `router` can predict a token's experts from its hidden state alone (not a router that reads a
    state from the previous layer, nor one that routes on the token ids)."""
    return not router.cfg.carries_state() and not router.cfg.routes_on_token_ids()


@torch.no_grad()
def predict_route(router: Router, x_TD: torch.Tensor, num_experts: int | None = None) -> RouterOutput:
    """The experts `router` would pick for the tokens `x_TD` (T, D): its own forward, no gradient.

    Returns a RouterOutput (ragged token/expert/weight, real experts only: with `num_experts` = E, the
    picks of router columns >= E - zero-computation experts, which have no weights to load - are
    left out and the scores cut to E columns). Raises ValueError for a router that cannot predict
    from a token (see the module doc).
    """
    if not can_predict(router):
        raise ValueError(f"{type(router).__name__} (kind={router.kind!r}) cannot predict experts from a hidden "
                         f"state: its logits read a routing state carried across layers; no prediction is made "
                         f"for such layers")
    route = router(x_TD)
    if num_experts is None or num_experts >= route.num_experts:
        return route
    route = route.keep(route.expert_idx_N < num_experts)
    return dataclasses.replace(route, scores_TE=route.scores_TE[:, :num_experts],
                               logits_TE=route.logits_TE[:, :num_experts])


def predict_experts(router: Router, x_TD: torch.Tensor, num_experts: int | None = None) -> torch.Tensor:
    """predicted_TK (int64, -1 = empty slot): per token, the experts `predict_route` picks, best first
    by the router's score (ties to the lower id). K = the most experts any token gets (0 if none)."""
    route = predict_route(router, x_TD, num_experts)
    ids_TK, _ = route.to_padded()
    E = route.num_experts
    # Sort the picks by id (empty slots last), then stably by score: best first, ties to the lower id.
    ids_TK = torch.where(ids_TK >= 0, ids_TK, E).sort(dim=1).values
    real_TK = ids_TK < E
    score_TK = torch.where(real_TK, route.scores_TE.gather(1, ids_TK.clamp(max=E - 1)), float("-inf"))
    order_TK = torch.sort(score_TK, dim=1, descending=True, stable=True).indices
    ids_TK = ids_TK.gather(1, order_TK)
    return torch.where(ids_TK < E, ids_TK, -1)


def priority_order(predicted_TK: torch.Tensor) -> list[int]:
    """The distinct experts of `predicted_TK`, rank-major: every token's best pick first, then every
    token's second pick, ... (the order a prefetcher loads them in)."""
    order, seen = [], set()
    for e in predicted_TK.t().reshape(-1).tolist():
        if e >= 0 and e not in seen:
            seen.add(e)
            order.append(e)
    return order
