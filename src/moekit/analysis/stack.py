"""Every cache capacity in one pass: Mattson stacks for priority replacement policies.

LRU, LFU, SCH(n), SCH-keep(n), set-MIN and bypass-MIN all evict by a priority that does not depend
on the capacity C (recency, use count, look-ahead count, next use). Mattson et al. ("Evaluation
techniques for storage hierarchies", IBM Systems Journal 1970) showed that such policies are
*stack algorithms*: the cache of C experts is always contained in the cache of C + 1, so one
ordered stack holds every capacity at once (cache_C = stack[:C]) and a request at stack
position p hits exactly for C > p. One pass gives the hit counts for every C <= C_max.

Legend of shape suffixes:
  R  rows: (policy, stream) pairs simulated side by side   D  stack depth (C_max)
  N  steps   K  expert slots per step (-1 = empty)   E  expert ids of a stream
  P  policies   L  streams (one per layer)

Update of one request x (keys: larger = kept longer). Let U = [x] + stack. For every C below
x's position p, the new cache is (U[:C+1]) minus its lowest-key member, so the new stack follows
from one running minimum over U: new[j] = U[j+1] unless U[j+1] is a new running minimum, in which
case the previous minimum sinks to j; new[p] = the minimum of U[:p+1]; below p nothing changes.
  * Demand policies (LRU, LFU, SCH-keep, set-MIN) give the step's experts the highest keys while
    the step runs: x lands on top and no expert the step requests is evicted (they need C >= K_max).
  * SCH (the paper's, arXiv 2505.16056; ljcleo/moe-lrc runs this same Mattson update) puts only x
    on top: the step's other experts keep true keys - the pending ones count this step's use, the
    inserted ones no longer do - so a later expert of the step may push an earlier one out. Any C.
  * bypass-MIN gives x its true key (its next use), so x may be dropped at once: the new cache is
    the C soonest-used of cache + step, exactly its definition.
Keys are unique per stream (they end in the request's recency index), so no tie is ambiguous and
the hit flags equal those of the one-capacity simulators in cache.py (tested).

The loop is over steps; each step is a handful of numpy operations over all (policy, stream)
rows at once, which is why the per-layer caches of every layer and every policy run together.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["POLICIES", "StackCurves", "stack_hit_curves"]

# Policies with a capacity-independent priority, simulated by `stack_hit_curves`.
POLICIES = ("lru", "lfu", "sch", "sch_keep", "set_min", "bypass_min")




@dataclass
class StackCurves:
    """Hit counts of every capacity 1..C_max.

    hits_PLC[p, l, c-1]: cold hits of policy p on stream l with capacity c (nan where the
    policy cannot run: demand policies need c >= the stream's K_max).
    requests_L, distinct_L: valid requests and distinct experts of each stream
    (warm hits = hits + min(c, distinct), see cache.py).
    """

    policies: list[str]
    hits_PLC: np.ndarray
    requests_L: np.ndarray
    distinct_L: np.ndarray
    k_max_L: np.ndarray

    def hits(self, policy: str, C: int) -> np.ndarray:
        """hits_L of one policy label (e.g. "lru", "sch16") at capacity C."""
        return self.hits_PLC[self.policies.index(policy), :, C - 1]

    def warm_hits(self, policy: str, C: int) -> np.ndarray:
        return self.hits(policy, C) + np.minimum(C, self.distinct_L)


_NEG = np.iinfo(np.int64).min  # key of an empty stack entry: below every real key
_CHUNK = 2048  # steps whose per-step inputs are prepared at once (bounds memory)


def _next_step_LNK(req_LNK: np.ndarray) -> np.ndarray:
    """Step of the next request of the same expert in the same stream (N if none)."""
    L, N, K = req_LNK.shape
    nxt = np.full(req_LNK.shape, N, dtype=np.int64)
    for layer in range(L):
        ids = req_LNK[layer].ravel()
        pos = np.nonzero(ids >= 0)[0]
        order = pos[np.argsort(ids[pos], kind="stable")]  # per expert, requests in step order
        same = ids[order[1:]] == ids[order[:-1]]
        nxt[layer].reshape(-1)[order[:-1][same]] = order[1:][same] // K
    return nxt


def _use_count_LNK(req_LNK: np.ndarray) -> np.ndarray:
    """How many times the request's expert has been requested so far, this request included."""
    L, N, K = req_LNK.shape
    out = np.zeros(req_LNK.shape, dtype=np.int64)
    for layer in range(L):
        ids = req_LNK[layer].ravel()
        pos = np.nonzero(ids >= 0)[0]
        order = pos[np.argsort(ids[pos], kind="stable")]
        sorted_ids = ids[order]
        first = np.r_[True, sorted_ids[1:] != sorted_ids[:-1]]
        start = np.maximum.accumulate(np.where(first, np.arange(order.size), 0))
        out[layer].reshape(-1)[order] = np.arange(order.size) - start + 1
    return out


def _window_uses_LNK(req_LNK: np.ndarray, num_ids: int, lookahead: int) -> np.ndarray:
    """Uses of the request's expert in the next `lookahead` steps (SCH's eviction count)."""
    L, N, K = req_LNK.shape
    out = np.zeros(req_LNK.shape, dtype=np.int64)
    for layer in range(L):
        r = req_LNK[layer]
        ok = r >= 0
        cs_NE = np.zeros((N + 1, num_ids + 1), dtype=np.int32)
        t_idx = np.nonzero(ok)[0]
        np.add.at(cs_NE, (t_idx + 1, r[ok]), 1)
        np.cumsum(cs_NE, axis=0, out=cs_NE)
        hi = np.minimum(np.arange(N) + 1 + lookahead, N)  # steps t+1 .. t+lookahead
        x = np.where(ok, r, num_ids)
        out[layer] = cs_NE[hi[:, None], x] - cs_NE[np.arange(N)[:, None] + 1, x]
    return out


def stack_hit_curves(req_LNK: np.ndarray, num_ids: int, C_max: int,
                     policies: Sequence[tuple[str, int]]) -> StackCurves:
    """Hits of every capacity 1..C_max for every (policy, n) on L parallel request streams.

    req_LNK: L streams of N steps (the per-layer streams of a trace share their token steps),
    expert ids in 0..num_ids-1, -1 = empty slot; a step must not repeat an expert.
    policies: (name, n) pairs, name in POLICIES; n is the segment length of SCH and SCH-keep (ignored
    otherwise; their look-ahead covers the next n-1 steps). Returns StackCurves with labels "lru",
    "lfu", "sch{n}", "sch_keep{n}", "set_min", "bypass_min" in the order given. Steps are tokens.
    """
    req_LNK = np.asarray(req_LNK, dtype=np.int64)
    if req_LNK.ndim != 3:
        raise ValueError(f"req_LNK must have shape (streams, steps, K_max), got {req_LNK.shape}")
    for name, n in policies:
        if name not in POLICIES:
            raise ValueError(f"unknown policy {name!r}; stack policies are {POLICIES}")
        if name in ("sch", "sch_keep") and n < 1:
            raise ValueError(f"SCH segment length n must be >= 1, got {n}")
    if C_max < 1:
        raise ValueError(f"C_max must be >= 1, got {C_max}")
    L, N, K = req_LNK.shape
    P, E, D = len(policies), num_ids, C_max
    R = P * L
    labels = [f"{name}{n}" if name in ("sch", "sch_keep") else name for name, n in policies]
    valid_LNK = req_LNK >= 0
    requests_L = valid_LNK.sum(axis=(1, 2))
    distinct_L = np.array([np.unique(req_LNK[layer][valid_LNK[layer]]).size for layer in range(L)])
    k_max_L = valid_LNK.sum(axis=2).max(axis=1) if N * K else np.zeros(L, dtype=np.int64)
    demand_P = np.array([name not in ("bypass_min", "sch") for name, _ in policies])  # need C >= K_max
    if N == 0 or K == 0:
        return StackCurves(labels, _mask_small(np.zeros((P, L, D)), demand_P, k_max_L), requests_L,
                           distinct_L, k_max_L)

    # Keys: larger = kept longer; hi * B + lo with lo = the request's recency index t*K + slot.
    B = N * K + 1
    top = N + 1  # hi of the step's protected experts: above any count, window or -next use
    rec_LNK = np.broadcast_to(np.arange(N)[:, None] * K + np.arange(K), req_LNK.shape)
    min_key_LNK = (-(_next_step_LNK(req_LNK) * B + rec_LNK)
                   if any(name.endswith("min") for name, _ in policies) else None)
    protected_LNK = top * B + rec_LNK
    post, pre, sch = [], [], []  # per policy: key after the step, key during it (shared arrays, not copies)
    for name, n in policies:
        if name == "lru":
            after = rec_LNK
        elif name == "lfu":
            after = _use_count_LNK(req_LNK) * B + rec_LNK
        elif name in ("sch", "sch_keep"):
            after = _window_uses_LNK(req_LNK, E, n - 1) * B + rec_LNK
        else:
            after = min_key_LNK
        post.append(after)
        pre.append(after if name == "bypass_min" else protected_LNK)
        sch.append(name in ("sch", "sch_keep") and n > 1)
    sch_P = np.array(sch)
    # Rows of the paper's SCH: only the request being inserted is protected (see the module doc).
    lrc_R = np.repeat(np.array([name == "sch" for name, _ in policies]), L)
    lrc = bool(lrc_R.any())
    n_P = np.array([n for _, n in policies])

    # State: plane 0 of SK_2DR holds the stack (ids, E = empty), plane 1 the keys of its entries.
    # Empty entries have the lowest key, so the running minimum stops at the first empty slot.
    W = E + 2  # key table columns: ids, E = empty (lowest key, never written), E + 1 = write sink
    key_flat = np.zeros(R * W, dtype=np.int64)
    off_R = np.arange(R) * W
    key_flat[off_R + E] = _NEG
    SK_2DR = np.empty((2, D, R), dtype=np.int64)
    SK_2DR[0], SK_2DR[1] = E, _NEG
    fill_211 = np.array([E, _NEG], dtype=np.int64)[:, None, None]
    pos_NKR = np.empty((N, K, R), dtype=np.int16)  # stack position of each request before its step
    j_D1 = np.arange(D + 1)[:, None]
    flat_base_DR = np.arange(D)[:, None] * 0 + np.arange(R)  # column offsets within a (D+1, R) plane
    sch_p = [p for p in range(P) if sch_P[p]]

    for c0 in range(0, N, _CHUNK):
        c1 = min(N, c0 + _CHUNK)
        # Per-step inputs, (steps, K, R) with policy-major rows; invalid slots read the empty
        # column (lowest key) and write to the sink column.
        x_TKR = np.tile(np.where(valid_LNK[:, c0:c1], req_LNK[:, c0:c1], E).transpose(1, 2, 0), (1, 1, P))
        ok_TKR = x_TKR < E
        write_TKR = np.where(ok_TKR, x_TKR, E + 1) + off_R
        pre_TKR = np.stack([a[:, c0:c1] for a in pre]).transpose(2, 3, 0, 1).reshape(c1 - c0, K, R)
        post_TKR = np.stack([a[:, c0:c1] for a in post]).transpose(2, 3, 0, 1).reshape(c1 - c0, K, R)
        top_TK21R = np.stack([x_TKR, np.where(ok_TKR, pre_TKR, _NEG)], axis=2)[:, :, :, None, :]
        if sch_p:
            # The window slides from (t, t+n-1] to (t+1, t+n] after step t: step t+1 leaves it,
            # step t+n enters it.
            ext = np.where(valid_LNK, req_LNK, E + 1)
            leave, enter = [], []
            for p in sch_p:
                steps = np.arange(c0, c1)
                lv = np.where((steps + 1 < N)[:, None, None], ext[:, np.minimum(steps + 1, N - 1)].transpose(1, 2, 0), E + 1)
                en = np.where((steps + n_P[p] < N)[:, None, None],
                              ext[:, np.minimum(steps + n_P[p], N - 1)].transpose(1, 2, 0), E + 1)
                leave.append(lv + off_R[p * L:(p + 1) * L])
                enter.append(en + off_R[p * L:(p + 1) * L])
            leave_TX = np.concatenate(leave, axis=2).reshape(c1 - c0, -1)
            enter_TX = np.concatenate(enter, axis=2).reshape(c1 - c0, -1)
        for i in range(c1 - c0):
            t = c0 + i
            x_KR = x_TKR[i]
            if lrc:
                # Pending experts of the step count this step's use: their key + one window use.
                pending_KR = key_flat[write_TKR[i]] + B
            key_flat[write_TKR[i]] = pre_TKR[i]
            if lrc:
                key_flat[write_TKR[i][:, lrc_R]] = pending_KR[:, lrc_R]
            stack_DR = SK_2DR[0]
            SK_2DR[1] = key_flat[stack_DR + off_R]
            eq_KDR = stack_DR[None] == x_KR[:, None, :]
            pos_NKR[t] = np.where(eq_KDR.any(axis=1) & ok_TKR[i], eq_KDR.argmax(axis=1), D)
            for j in range(K):
                # Remove x's old entry (it becomes an empty slot), put x on top, sink running minima.
                eq_DR = eq_KDR[j] if j == 0 else SK_2DR[0] == x_KR[j]
                UK_2D1R = np.concatenate([top_TK21R[i, j], np.where(eq_DR, fill_211, SK_2DR)], axis=1)
                key_D1R = UK_2D1R[1]
                newmin_D1R = key_D1R == np.minimum.accumulate(key_D1R, axis=0)
                arg_D1R = np.maximum.accumulate(np.where(newmin_D1R, j_D1, 0), axis=0)
                idx_DR = np.where(newmin_D1R[1:], arg_D1R[:-1], j_D1[1:])
                SK_2DR = UK_2D1R.reshape(2, -1).take(idx_DR * R + flat_base_DR, axis=1).reshape(2, D, R)
                if lrc:  # x, now on top, takes its true key: later experts of the step may evict it
                    SK_2DR[1, 0] = np.where(lrc_R & ok_TKR[i, j], post_TKR[i, j], SK_2DR[1, 0])
            key_flat[write_TKR[i]] = post_TKR[i]
            if sch_p:
                key_flat[leave_TX[i]] -= B
                key_flat[enter_TX[i]] += B

    pos_RX = pos_NKR.transpose(2, 0, 1).reshape(R, -1).astype(np.int64)
    counts_RD = np.stack([np.bincount(row[row < D], minlength=D) for row in pos_RX]) if R else np.zeros((0, D))
    hits_PLC = np.cumsum(counts_RD, axis=1).astype(np.float64).reshape(P, L, D)  # hit at C iff position < C
    return StackCurves(labels, _mask_small(hits_PLC, demand_P, k_max_L), requests_L, distinct_L, k_max_L)


def _mask_small(hits_PLC: np.ndarray, demand_P: np.ndarray, k_max_L: np.ndarray) -> np.ndarray:
    """nan where a demand policy cannot run: capacity below the stream's K_max."""
    C = np.arange(1, hits_PLC.shape[2] + 1)
    hits_PLC[demand_P[:, None, None] & (C[None, None, :] < k_max_L[None, :, None])] = np.nan
    return hits_PLC
