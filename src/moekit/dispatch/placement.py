"""Where experts live across the ranks of an expert-parallel group, and what a placement costs.

Legend: E experts per layer, W ranks of the expert-parallel (EP) group, L MoE layers, T tokens,
K experts per token (padded with -1).

A `Placement` maps each expert of one layer to (rank, local index): rank r stacks its E/W experts
in local-index order, so slot = rank * E/W + local is the expert's position in the rank-major
concatenation of every rank's shard. `Placement.contiguous` puts experts r*E/W .. (r+1)*E/W - 1 on
rank r (slot = expert id).

Cost model (the dispatcher of `moekit.dispatch.expert_parallel`): a token whose row sits on rank h
(its *home*) when layer l runs sends the row once to every other rank holding one of its experts
at l, and gets one partial sum back from each, so tokens whose experts are all local move nothing.
With a home per layer (`home_LT`, speculative token shuffling), the output of layer l goes to the
home of layer l + 1: partial sums from the expert ranks, plus the token's own row when the new home
holds neither the row nor one of its experts. See `traffic`.

Analysis over a routing trace's per-layer expert ids `experts_LTK` (the executed experts of each
token, -1 = empty slot, as in `RoutingTrace.seqs` with sequences concatenated along T):
  (a) `traffic`: rows and per-assignment metadata crossing ranks, bytes per token;
  (b) `affinity_placement`: per-layer placements keeping consecutive layers' frequent expert pairs
      on one rank (ExFlow, arXiv 2401.08383), balanced E/W experts per rank and layer;
  (c) `speculative_homes`: speculative token shuffling (Speculative MoE, arXiv 2503.04398): move each
      token to the rank holding most of its (predicted) experts, tokens balanced over ranks.
Applying a placement = renumbering experts so that it becomes contiguous: `permute_experts_`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from moekit.config import RouterConfig
from moekit.errors import UsageError
from moekit.utils.assign import assign_min_cost as _assign_min_cost  # tests and this module use the old name

__all__ = ["Placement", "Traffic", "affinity_placement", "colocated_pairs", "contiguous_homes",
           "following_homes", "permute_experts_", "placement_report", "speculative_homes", "traffic"]


@dataclass(frozen=True)
class Placement:
    """Expert e of one layer lives on rank `rank_E[e]` at local index `local_E[e]` of that rank's shard.

    Every rank holds E/W experts and its local indices are 0..E/W-1. Raises UsageError otherwise.
    """

    rank_E: tuple[int, ...]
    local_E: tuple[int, ...]
    num_ranks: int

    def __post_init__(self) -> None:
        E, W = len(self.rank_E), self.num_ranks
        if W < 1:
            raise UsageError(f"Placement: num_ranks={W} is invalid; expected an integer >= 1")
        if E == 0 or E % W:
            raise UsageError(f"Placement: {E} experts cannot be sharded over {W} ranks; expected a number of "
                             f"experts divisible by the expert-parallel size")
        if len(self.local_E) != E:
            raise UsageError(f"Placement: local_E has {len(self.local_E)} entries for {E} experts")
        per_rank = E // W
        for r in range(W):
            locals_r = sorted(loc for rank, loc in zip(self.rank_E, self.local_E, strict=True) if rank == r)
            if locals_r != list(range(per_rank)):
                raise UsageError(f"Placement: rank {r} holds local indices {locals_r}; expected each rank in "
                                 f"0..{W - 1} to hold exactly {per_rank} experts at local indices 0..{per_rank - 1}")

    @classmethod
    def contiguous(cls, num_experts: int, num_ranks: int) -> Placement:
        """Experts r*E/W .. (r+1)*E/W - 1 on rank r, in order (the default)."""
        if num_ranks < 1 or num_experts % num_ranks:
            raise UsageError(f"Placement: {num_experts} experts cannot be sharded over {num_ranks} ranks; expected "
                             f"a number of experts divisible by the expert-parallel size")
        per_rank = num_experts // num_ranks
        return cls(tuple(e // per_rank for e in range(num_experts)), tuple(e % per_rank for e in range(num_experts)),
                   num_ranks)

    @classmethod
    def from_ranks(cls, rank_E, num_ranks: int) -> Placement:
        """A placement from a rank per expert; each rank stacks its experts in increasing expert id."""
        rank_E = [int(r) for r in np.asarray(rank_E).reshape(-1)]
        if any(not 0 <= r < num_ranks for r in rank_E):
            raise UsageError(f"Placement: ranks must lie in 0..{num_ranks - 1}, got {sorted(set(rank_E))}")
        seen = [0] * num_ranks
        local_E = []
        for r in rank_E:
            local_E.append(seen[r])
            seen[r] += 1
        return cls(tuple(rank_E), tuple(local_E), num_ranks)

    @property
    def num_experts(self) -> int:
        return len(self.rank_E)

    @property
    def experts_per_rank(self) -> int:
        return self.num_experts // self.num_ranks

    def slot_E(self) -> np.ndarray:
        """(E,) int64: rank * E/W + local index, the expert's row in the rank-major stacking of shards."""
        return np.asarray(self.rank_E, dtype=np.int64) * self.experts_per_rank + np.asarray(self.local_E, dtype=np.int64)

    def order_E(self) -> np.ndarray:
        """(E,) int64: the expert at each slot. Renumbering experts by it makes the placement contiguous."""
        order = np.empty(self.num_experts, dtype=np.int64)
        order[self.slot_E()] = np.arange(self.num_experts)
        return order

    def local_experts(self, rank: int) -> list[int]:
        """Global ids of the experts rank `rank` holds, in local-index order."""
        per_rank = self.experts_per_rank
        return self.order_E()[rank * per_rank:(rank + 1) * per_rank].tolist()

    def is_contiguous(self) -> bool:
        return bool((self.slot_E() == np.arange(self.num_experts)).all())


def _check_experts(experts_LTK, num_experts: int | None = None) -> np.ndarray:
    experts_LTK = np.asarray(experts_LTK)
    if experts_LTK.ndim != 3 or not np.issubdtype(experts_LTK.dtype, np.integer):
        raise ValueError(f"experts_LTK must be an integer array (layers, tokens, K) with -1 for empty slots, got "
                         f"dtype {experts_LTK.dtype} shape {experts_LTK.shape}")
    if experts_LTK.size and experts_LTK.min() < -1:
        raise ValueError(f"experts_LTK: expert ids must be >= 0 or -1 (empty slot), got {int(experts_LTK.min())}")
    if num_experts is not None and experts_LTK.size and experts_LTK.max() >= num_experts:
        raise ValueError(f"experts_LTK: expert id {int(experts_LTK.max())} is out of range for {num_experts} experts")
    return experts_LTK.astype(np.int64, copy=False)


def _check_ranks(rank_LE, num_layers: int, num_ranks: int) -> np.ndarray:
    rank_LE = np.asarray(rank_LE, dtype=np.int64)
    if rank_LE.ndim == 1:
        rank_LE = np.broadcast_to(rank_LE, (num_layers, rank_LE.size))
    if rank_LE.ndim != 2 or rank_LE.shape[0] != num_layers:
        raise ValueError(f"rank_LE must be (E,) or ({num_layers}, E) ranks, got shape {rank_LE.shape}")
    if rank_LE.size and (rank_LE.min() < 0 or rank_LE.max() >= num_ranks):
        raise ValueError(f"rank_LE: ranks must lie in 0..{num_ranks - 1}")
    return rank_LE


def _ranks_used_TW(experts_TK: np.ndarray, rank_E: np.ndarray, num_ranks: int) -> np.ndarray:
    """(T, W) int64: how many of each token's experts live on each rank."""
    T = experts_TK.shape[0]
    used_TW = np.zeros((T, num_ranks), dtype=np.int64)
    t_idx, k_idx = np.nonzero(experts_TK >= 0)
    np.add.at(used_TW, (t_idx, rank_E[experts_TK[t_idx, k_idx]]), 1)
    return used_TW


@dataclass(frozen=True)
class Traffic:
    """Cross-rank traffic of one pass over a trace (see the module doc's cost model).

    dispatch_rows_L: token rows sent to expert ranks, per layer
    combine_rows_L: rows sent back (partial sums, and rows moving to a new home), per layer
    remote_assignments_L: assignments whose expert is not on the token's home rank (each carries an
        int64 row index and a combine weight)
    """

    dispatch_rows_L: np.ndarray
    combine_rows_L: np.ndarray
    remote_assignments_L: np.ndarray
    num_tokens: int

    @property
    def rows(self) -> int:
        return int(self.dispatch_rows_L.sum() + self.combine_rows_L.sum())

    def bytes_per_token(self, d_model: int, itemsize: int, weight_itemsize: int = 4) -> float:
        """All-to-all bytes per token of the whole pass: rows of d_model elements of `itemsize` bytes, plus
        each remote assignment's row index (8 bytes) and weight (`weight_itemsize` bytes)."""
        total = self.rows * d_model * itemsize + int(self.remote_assignments_L.sum()) * (8 + weight_itemsize)
        return total / max(self.num_tokens, 1)


def contiguous_homes(num_tokens: int, num_ranks: int) -> np.ndarray:
    """(T,) int64: token t lives on rank t * W // T (equal contiguous blocks, as a data loader splits a batch)."""
    return np.arange(num_tokens, dtype=np.int64) * num_ranks // max(num_tokens, 1)


def traffic(experts_LTK, rank_LE, num_ranks: int, home_LT=None) -> Traffic:
    """Rows crossing ranks when tokens at `home_LT` run the experts `experts_LTK` placed by `rank_LE`.

    experts_LTK: (L, T, K) int, executed expert ids per token and layer, -1 = empty slot.
    rank_LE: (L, E) or (E,) int, the rank holding each expert (per layer or the same for all).
    home_LT: (T,) or (L, T) int, the rank holding each token's row when layer l runs (default:
        `contiguous_homes`). With (L, T), layer l's output goes to home_LT[l + 1] (the last layer's
        stays home).

    Per token and layer, with R the set of ranks holding its experts, h its home and h' the next home:
      dispatch = |R \\ {h}|,  combine = |R \\ {h'}| + [h' not in R and h' != h]  (the row itself moves).
    With fixed homes combine = dispatch: the measured rows of `ExpertParallel` (a test checks it).
    """
    experts_LTK = _check_experts(experts_LTK)
    L, T, _ = experts_LTK.shape
    rank_LE = _check_ranks(rank_LE, L, num_ranks)
    if experts_LTK.size and experts_LTK.max() >= rank_LE.shape[1]:
        raise ValueError(f"experts_LTK: expert id {int(experts_LTK.max())} has no rank in rank_LE "
                         f"({rank_LE.shape[1]} experts)")
    home_LT = contiguous_homes(T, num_ranks) if home_LT is None else np.asarray(home_LT, dtype=np.int64)
    if home_LT.ndim == 1:
        home_LT = np.broadcast_to(home_LT, (L, T))
    if home_LT.shape != (L, T):
        raise ValueError(f"home_LT must be ({T},) or ({L}, {T}) ranks, got shape {home_LT.shape}")
    if home_LT.size and (home_LT.min() < 0 or home_LT.max() >= num_ranks):
        raise ValueError(f"home_LT: ranks must lie in 0..{num_ranks - 1}")
    dispatch_L = np.zeros(L, dtype=np.int64)
    combine_L = np.zeros(L, dtype=np.int64)
    remote_L = np.zeros(L, dtype=np.int64)
    tokens = np.arange(T)
    for layer in range(L):
        used_TW = _ranks_used_TW(experts_LTK[layer], rank_LE[layer], num_ranks)
        home_T, next_T = home_LT[layer], home_LT[min(layer + 1, L - 1)]
        held_T = (used_TW > 0).sum(1)
        at_home_T, at_next_T = used_TW[tokens, home_T] > 0, used_TW[tokens, next_T] > 0
        dispatch_L[layer] = (held_T - at_home_T).sum()
        combine_L[layer] = (held_T - at_next_T).sum() + (~at_next_T & (next_T != home_T)).sum()
        remote_L[layer] = used_TW.sum() - used_TW[tokens, home_T].sum()
    return Traffic(dispatch_L, combine_L, remote_L, T)


def _multi_hot_TE(experts_TK: np.ndarray, num_experts: int) -> np.ndarray:
    hot_TE = np.zeros((experts_TK.shape[0], num_experts), dtype=np.float64)
    t_idx, k_idx = np.nonzero(experts_TK >= 0)
    hot_TE[t_idx, experts_TK[t_idx, k_idx]] = 1.0
    return hot_TE


def _pair_counts(experts_LTK: np.ndarray, num_experts: int) -> list[np.ndarray]:
    """A[l][i, j] = tokens using expert i at layer l and expert j at layer l + 1 (every pair of a token's slots)."""
    hots = [_multi_hot_TE(experts_LTK[layer], num_experts) for layer in range(experts_LTK.shape[0])]
    return [hots[layer].T @ hots[layer + 1] for layer in range(len(hots) - 1)]


def colocated_pairs(experts_LTK, rank_LE, num_experts: int) -> float:
    """Share of consecutive-layer expert pairs (a token's expert i at l and j at l + 1) held by one rank:
    the quantity `affinity_placement` maximises (1.0 when there is no pair)."""
    experts_LTK = _check_experts(experts_LTK, num_experts)
    rank_LE = np.asarray(rank_LE, dtype=np.int64)
    pairs = _pair_counts(experts_LTK, num_experts)
    total = sum(float(a.sum()) for a in pairs)
    same = sum(float(a[rank_LE[layer][:, None] == rank_LE[layer + 1][None, :]].sum()) for layer, a in enumerate(pairs))
    return same / total if total else 1.0


def _balanced_ranks(score_EW: np.ndarray) -> np.ndarray:
    """(E,) ranks maximising sum_e score_EW[e, rank_e] with exactly E/W experts per rank (exact: an
    assignment of experts to the W * E/W rank slots)."""
    E, W = score_EW.shape
    slots_per_rank = E // W
    cost_EE = -np.repeat(score_EW, slots_per_rank, axis=1)  # column c is a slot of rank c // (E/W)
    return _assign_min_cost(cost_EE) // slots_per_rank


def affinity_placement(experts_LTK, num_experts: int, num_ranks: int, max_sweeps: int = 10) -> np.ndarray:
    """(L, E) int64 ranks: a balanced per-layer placement keeping consecutive layers' expert pairs together.

    Objective (ExFlow, arXiv 2401.08383, whose integer program counts a token's consecutive-layer hop
    between two GPUs): maximise sum over l, tokens, and pairs (i in the token's experts at l, j in
    its experts at l + 1) of [rank_l(i) == rank_{l+1}(j)] — see `colocated_pairs` — subject to every
    rank holding exactly E/W experts of every layer. For top-1 routing this is the number of token
    hops that stay on one rank.

    Method (NOTE: not ExFlow's solver, which is a Gurobi integer program with hierarchical bipartition):
    block-coordinate ascent. Layer 0 starts contiguous; each later layer is placed given the one
    before; then sweeps re-place each layer given both neighbours until a sweep gains nothing or
    `max_sweeps` ends. Each step is an exact balanced assignment (Hungarian method), so the objective
    never decreases; the result is a local optimum, not always the global one.
    """
    experts_LTK = _check_experts(experts_LTK, num_experts)
    if num_ranks < 1 or num_experts % num_ranks:
        raise UsageError(f"affinity_placement: {num_experts} experts cannot be sharded over {num_ranks} ranks; "
                         f"expected a number of experts divisible by the expert-parallel size")
    L = experts_LTK.shape[0]
    pairs = _pair_counts(experts_LTK, num_experts)
    rank_LE = np.empty((L, num_experts), dtype=np.int64)
    rank_LE[0] = np.arange(num_experts) // (num_experts // num_ranks)
    eye_WW = np.eye(num_ranks)

    def score_EW(layer: int, use_next: bool) -> np.ndarray:
        score = np.zeros((num_experts, num_ranks))
        if layer > 0:
            score += pairs[layer - 1].T @ eye_WW[rank_LE[layer - 1]]
        if use_next and layer < L - 1:
            score += pairs[layer] @ eye_WW[rank_LE[layer + 1]]
        return score

    for layer in range(1, L):
        rank_LE[layer] = _balanced_ranks(score_EW(layer, use_next=False))
    best = colocated_pairs(experts_LTK, rank_LE, num_experts)
    for _ in range(max_sweeps):
        for layer in range(L):
            rank_LE[layer] = _balanced_ranks(score_EW(layer, use_next=True))
        now = colocated_pairs(experts_LTK, rank_LE, num_experts)
        if now <= best + 1e-12:
            break
        best = now
    return rank_LE


def speculative_homes(experts_TK, rank_E, num_ranks: int, capacity: int | None = None) -> np.ndarray:
    """(T,) int64: a home rank per token holding as many of its experts as possible, tokens balanced.

    Speculative token shuffling (Speculative MoE, arXiv 2503.04398): before a layer dispatches, move
    each token to the rank that holds most of its (predicted) experts, so that fewer rows cross
    ranks. `experts_TK` are the experts the shuffle relies on: the executed ones of a trace give the
    bound an oracle reaches; a gate-based prediction (a trace's `prefetch_d` column) gives what a
    speculative system can do. Evaluate the homes with `traffic` on the *executed* experts.

    Objective, over homes with at most `capacity` tokens per rank (default ceil(T / W): balanced
    attention work): first the number of rows that cross ranks (a token's row stays home when its home
    holds any of its experts), then the number of its assignments away from home (their metadata).
    Both are one additive score per (token, rank): [rank holds one of its experts] * (T*K + 1) +
    (its experts on that rank). Greedy by regret: tokens whose best rank beats their second best by
    most are placed first, each on its best rank with room left. Exact for W = 2 (each side gets the
    tokens with the largest margins, a test checks it against brute force); a heuristic for W > 2.
    Tokens with no expert fill the remaining room.
    """
    experts_TK = np.asarray(experts_TK, dtype=np.int64)
    if experts_TK.ndim != 2:
        raise ValueError(f"experts_TK must be (tokens, K) expert ids with -1 for empty slots, got shape "
                         f"{experts_TK.shape}")
    rank_E = np.asarray(rank_E, dtype=np.int64)
    T = experts_TK.shape[0]
    capacity = math.ceil(T / num_ranks) if capacity is None else capacity
    if capacity * num_ranks < T:
        raise UsageError(f"speculative_homes: capacity={capacity} tokens per rank cannot hold {T} tokens on "
                         f"{num_ranks} ranks; expected capacity >= {math.ceil(T / num_ranks)}")
    used_TW = _ranks_used_TW(_check_experts(experts_TK[None], rank_E.size)[0], rank_E, num_ranks)
    score_TW = (used_TW > 0) * (T * experts_TK.shape[1] + 1) + used_TW
    top2_T2 = -np.sort(-score_TW, axis=1)[:, :2] if num_ranks > 1 else np.pad(score_TW, ((0, 0), (0, 1)))
    regret_T = top2_T2[:, 0] - top2_T2[:, 1]
    prefs_TW = np.argsort(-score_TW, axis=1, kind="stable")
    room_W = np.full(num_ranks, capacity, dtype=np.int64)
    home_T = np.empty(T, dtype=np.int64)
    # stable: among equal regrets, earlier tokens first (deterministic)
    for t in np.argsort(-regret_T, kind="stable"):
        prefs = prefs_TW[t]
        rank = prefs[np.argmax(room_W[prefs] > 0)]
        home_T[t] = rank
        room_W[rank] -= 1
    return home_T


def following_homes(experts_LTK, rank_LE, num_ranks: int) -> np.ndarray:
    """(L, T) int64 homes where a token follows its experts (ExFlow's setting, arXiv 2401.08383: the
    token stays on the rank of its expert and the next layer runs there): layer 0 at `contiguous_homes`,
    layer l + 1 at the rank of the token's first expert at layer l (its home again when it had none)."""
    experts_LTK = _check_experts(experts_LTK)
    L, T, _ = experts_LTK.shape
    rank_LE = _check_ranks(rank_LE, L, num_ranks)
    home_LT = np.empty((L, T), dtype=np.int64)
    home_LT[0] = contiguous_homes(T, num_ranks)
    for layer in range(L - 1):
        first_T = experts_LTK[layer, :, 0] if experts_LTK.shape[2] else np.full(T, -1)
        home_LT[layer + 1] = np.where(first_T >= 0, rank_LE[layer][np.maximum(first_T, 0)], home_LT[layer])
    return home_LT


def placement_report(experts_LTK, num_experts: int, num_ranks: int, d_model: int, itemsize: int = 2,
                     predicted_LTK=None) -> dict:
    """All-to-all bytes per token of a trace under (a) the current contiguous placement with fixed homes
    (data-parallel attention: moekit's layout), and with tokens following their experts; (b) ExFlow's
    affinity placement, tokens following their experts (its setting: `following_homes`); (c)
    speculative token shuffling (contiguous placement), and (b)'s placement with (c); and the bytes each
    saves against (a). Affinity only pays where tokens move with their experts: with fixed homes a
    layer's cost does not depend on the next layer's placement.

    experts_LTK: a trace's executed experts (L, T, K), -1 = empty slot (`RoutingTrace.stacked()`),
    tokens split into W contiguous blocks as a data loader splits a batch. predicted_LTK: the experts
    the shuffle may rely on (e.g. a trace's `prefetch` prediction; default: the executed ones, the
    oracle bound). d_model, itemsize: a row's width and element size (2 = bf16). Returns a dict of
    JSON-ready numbers: bytes_per_token per scheme, saved_fraction against the current placement, the
    affinity placement's rank per (layer, expert), and the co-located consecutive-layer pairs.
    """
    experts_LTK = _check_experts(experts_LTK, num_experts)
    L, T, _ = experts_LTK.shape
    predicted_LTK = experts_LTK if predicted_LTK is None else _check_experts(predicted_LTK, num_experts)
    contiguous_LE = np.broadcast_to(np.arange(num_experts) // (num_experts // num_ranks), (L, num_experts))
    affinity_LE = affinity_placement(experts_LTK, num_experts, num_ranks)

    def shuffled(rank_LE: np.ndarray) -> np.ndarray:
        return np.stack([speculative_homes(predicted_LTK[layer], rank_LE[layer], num_ranks) for layer in range(L)])

    schemes = {
        "current": traffic(experts_LTK, contiguous_LE, num_ranks),
        "current_follow": traffic(experts_LTK, contiguous_LE, num_ranks, following_homes(experts_LTK, contiguous_LE,
                                                                                        num_ranks)),
        "affinity": traffic(experts_LTK, affinity_LE, num_ranks, following_homes(experts_LTK, affinity_LE, num_ranks)),
        "speculative": traffic(experts_LTK, contiguous_LE, num_ranks, shuffled(contiguous_LE)),
        "affinity+speculative": traffic(experts_LTK, affinity_LE, num_ranks, shuffled(affinity_LE)),
    }
    per_token = {name: t.bytes_per_token(d_model, itemsize) for name, t in schemes.items()}
    base = per_token["current"]
    return {
        "tokens": T, "layers": L, "experts": num_experts, "ranks": num_ranks, "d_model": d_model,
        "itemsize": itemsize,
        "bytes_per_token": per_token,
        "saved_fraction": {name: (1 - v / base) if base else 0.0 for name, v in per_token.items()},
        "colocated_pairs": {"current": colocated_pairs(experts_LTK, contiguous_LE, num_experts),
                            "affinity": colocated_pairs(experts_LTK, affinity_LE, num_experts)},
        "affinity_rank_LE": affinity_LE.tolist(),
    }


@torch.no_grad()
def permute_experts_(order_E, bank: torch.nn.Module, router: torch.nn.Module) -> None:
    """Renumber the experts of one layer in place: new expert j is old expert `order_E[j]`.

    Permutes, consistently, every per-expert tensor of the bank (`ExpertBank.expert_stacks`: weights in
    any layout and expert biases) and of the router: the tensors its class declares in
    `Router.expert_tensors` (gate rows, a selection bias, a gate bias) and `expert_mask_E`. The layer
    computes the same outputs; only expert ids change (executed ids map through the inverse permutation).
    `Placement.order_E()` is the renumbering that makes a placement contiguous.

    Apply between optimiser steps and before building the optimiser (its per-parameter state is not
    permuted). Raises ValueError for a permutation of the wrong length or not a permutation, for
    group-limited routing (n_group > 1) when experts would change group, and for a declared per-expert
    tensor without one row per expert.
    """
    E = bank.num_experts
    try:
        stacks = bank.expert_stacks()  # before anything changes: refuses storage it cannot renumber by row
    except ValueError as e:
        raise ValueError(f"permute_experts_: {e}") from None
    order_E = torch.as_tensor(np.asarray(order_E), dtype=torch.int64)
    if order_E.shape != (E,) or not torch.equal(order_E.sort().values, torch.arange(E)):
        raise ValueError(f"permute_experts_: order_E must be a permutation of 0..{E - 1}, got {order_E.tolist()}")
    cfg = getattr(router, "cfg", None)
    n_group = cfg.expert_groups() if isinstance(cfg, RouterConfig) else 1  # the router config says (#13)
    if n_group > 1:
        per_group = E // n_group
        groups_GP = (order_E // per_group).view(n_group, per_group)
        if not bool((groups_GP == groups_GP[:, :1]).all()):
            raise ValueError(f"permute_experts_: group-limited routing (n_group={n_group}) ranks groups of "
                             f"{per_group} consecutive experts; expected a permutation that moves whole groups")
    per_expert = {name: getattr(router, name, None) for name in type(router).expert_tensors}
    per_expert["expert_mask_E"] = getattr(router, "expert_mask_E", None)
    per_expert |= {f"experts.{name}": w for name, w in stacks.items()}
    for name, tensor in per_expert.items():
        if tensor is None:
            continue
        if tensor.dim() == 0 or tensor.shape[0] != E:
            raise ValueError(f"permute_experts_: tensor {name!r} has shape {tuple(tensor.shape)}; expected "
                             f"{E} rows, one per expert")
        tensor.copy_(tensor[order_E.to(tensor.device)])
