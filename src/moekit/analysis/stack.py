"""Every cache capacity in one pass: Mattson stacks for priority replacement policies.

LRU, LFU, SCH(n), SCH-keep(n), set-MIN and bypass-MIN all evict by a priority that does not depend
on the capacity C (recency, use count, look-ahead count, next use). Mattson et al. ("Evaluation
techniques for storage hierarchies", IBM Systems Journal 1970) showed that such policies are
*stack algorithms*: the cache of C experts is always contained in the cache of C + 1, so one
ordered stack holds every capacity at once (cache_C = stack[:C]) and a request at stack
position p hits exactly for C > p. One pass gives the hit counts for every C <= C_max.

Legend (the analysis letters of moekit.analysis):
  Z  rows: (policy, stream) pairs simulated side by side   C  stack depth (C_max positions)
  Q  steps   K  expert slots per step (-1 = empty)   E  expert ids of a stream
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


def _next_step_LQK(req_LQK: np.ndarray) -> np.ndarray:
    """Step of the next request of the same expert in the same stream (Q if none)."""
    L, Q, K = req_LQK.shape
    nxt = np.full(req_LQK.shape, Q, dtype=np.int64)
    for layer in range(L):
        ids = req_LQK[layer].ravel()
        pos = np.nonzero(ids >= 0)[0]
        order = pos[np.argsort(ids[pos], kind="stable")]  # per expert, requests in step order
        same = ids[order[1:]] == ids[order[:-1]]
        nxt[layer].reshape(-1)[order[:-1][same]] = order[1:][same] // K
    return nxt


def _use_count_LQK(req_LQK: np.ndarray) -> np.ndarray:
    """How many times the request's expert has been requested so far, this request included."""
    L, Q, K = req_LQK.shape
    out = np.zeros(req_LQK.shape, dtype=np.int64)
    for layer in range(L):
        ids = req_LQK[layer].ravel()
        pos = np.nonzero(ids >= 0)[0]
        order = pos[np.argsort(ids[pos], kind="stable")]
        sorted_ids = ids[order]
        first = np.r_[True, sorted_ids[1:] != sorted_ids[:-1]]
        start = np.maximum.accumulate(np.where(first, np.arange(order.size), 0))
        out[layer].reshape(-1)[order] = np.arange(order.size) - start + 1
    return out


def _window_uses_LQK(req_LQK: np.ndarray, num_ids: int, lookahead: int) -> np.ndarray:
    """Uses of the request's expert in the next `lookahead` steps (SCH's eviction count)."""
    L, Q, K = req_LQK.shape
    out = np.zeros(req_LQK.shape, dtype=np.int64)
    for layer in range(L):
        r = req_LQK[layer]
        ok = r >= 0
        cs_QE = np.zeros((Q + 1, num_ids + 1), dtype=np.int32)
        t_idx = np.nonzero(ok)[0]
        np.add.at(cs_QE, (t_idx + 1, r[ok]), 1)
        np.cumsum(cs_QE, axis=0, out=cs_QE)
        hi = np.minimum(np.arange(Q) + 1 + lookahead, Q)  # steps t+1 .. t+lookahead
        x = np.where(ok, r, num_ids)
        out[layer] = cs_QE[hi[:, None], x] - cs_QE[np.arange(Q)[:, None] + 1, x]
    return out


def stack_hit_curves(req_LQK: np.ndarray, num_ids: int, C_max: int,
                     policies: Sequence[tuple[str, int]]) -> StackCurves:
    """Hits of every capacity 1..C_max for every (policy, n) on L parallel request streams.

    req_LQK: L streams of Q steps (the per-layer streams of a trace share their token steps),
    expert ids in 0..num_ids-1, -1 = empty slot; a step must not repeat an expert.
    policies: (name, n) pairs, name in POLICIES; n is the segment length of SCH and SCH-keep (ignored
    otherwise; their look-ahead covers the next n-1 steps). Returns StackCurves with labels "lru",
    "lfu", "sch{n}", "sch_keep{n}", "set_min", "bypass_min" in the order given. Steps are tokens.
    """
    req_LQK = np.asarray(req_LQK, dtype=np.int64)
    if req_LQK.ndim != 3:
        raise ValueError(f"req_LQK must have shape (streams, steps, K_max), got {req_LQK.shape}")
    for name, n in policies:
        if name not in POLICIES:
            raise ValueError(f"unknown policy {name!r}; stack policies are {POLICIES}")
        if name in ("sch", "sch_keep") and n < 1:
            raise ValueError(f"SCH segment length n must be >= 1, got {n}")
    if C_max < 1:
        raise ValueError(f"C_max must be >= 1, got {C_max}")
    L, Q, K = req_LQK.shape
    P, E = len(policies), num_ids
    Z = P * L
    labels = [f"{name}{n}" if name in ("sch", "sch_keep") else name for name, n in policies]
    valid_LQK = req_LQK >= 0
    requests_L = valid_LQK.sum(axis=(1, 2))
    distinct_L = np.array([np.unique(req_LQK[layer][valid_LQK[layer]]).size for layer in range(L)])
    k_max_L = valid_LQK.sum(axis=2).max(axis=1) if Q * K else np.zeros(L, dtype=np.int64)
    demand_P = np.array([name not in ("bypass_min", "sch") for name, _ in policies])  # need C >= K_max
    if Q == 0 or K == 0:
        return StackCurves(labels, _mask_small(np.zeros((P, L, C_max)), demand_P, k_max_L), requests_L,
                           distinct_L, k_max_L)

    # Keys: larger = kept longer; hi * B + lo with lo = the request's recency index t*K + slot.
    B = Q * K + 1
    top = Q + 1  # hi of the step's protected experts: above any count, window or -next use
    rec_LQK = np.broadcast_to(np.arange(Q)[:, None] * K + np.arange(K), req_LQK.shape)
    min_key_LQK = (-(_next_step_LQK(req_LQK) * B + rec_LQK)
                   if any(name.endswith("min") for name, _ in policies) else None)
    protected_LQK = top * B + rec_LQK
    post, pre, sch = [], [], []  # per policy: key after the step, key during it (shared arrays, not copies)
    for name, n in policies:
        if name == "lru":
            after = rec_LQK
        elif name == "lfu":
            after = _use_count_LQK(req_LQK) * B + rec_LQK
        elif name in ("sch", "sch_keep"):
            after = _window_uses_LQK(req_LQK, E, n - 1) * B + rec_LQK
        else:
            after = min_key_LQK
        post.append(after)
        pre.append(after if name == "bypass_min" else protected_LQK)
        sch.append(name in ("sch", "sch_keep") and n > 1)
    sch_P = np.array(sch)
    # Rows of the paper's SCH: only the request being inserted is protected (see the module doc).
    lrc_Z = np.repeat(np.array([name == "sch" for name, _ in policies]), L)
    lrc = bool(lrc_Z.any())
    n_P = np.array([n for _, n in policies])

    # State: plane 0 of SK_2CZ holds the stack (ids, E = empty), plane 1 the keys of its entries.
    # Empty entries have the lowest key, so the running minimum stops at the first empty slot.
    W = E + 2  # key table columns: ids, E = empty (lowest key, never written), E + 1 = write sink
    key_flat = np.zeros(Z * W, dtype=np.int64)
    off_Z = np.arange(Z) * W
    key_flat[off_Z + E] = _NEG
    SK_2CZ = np.empty((2, C_max, Z), dtype=np.int64)
    SK_2CZ[0], SK_2CZ[1] = E, _NEG
    fill_211 = np.array([E, _NEG], dtype=np.int64)[:, None, None]
    pos_QKZ = np.empty((Q, K, Z), dtype=np.int16)  # stack position of each request before its step
    j_C1 = np.arange(C_max + 1)[:, None]
    flat_base_CZ = np.arange(C_max)[:, None] * 0 + np.arange(Z)  # column offsets within a (C_max+1, Z) plane
    sch_p = [p for p in range(P) if sch_P[p]]

    for c0 in range(0, Q, _CHUNK):
        c1 = min(Q, c0 + _CHUNK)
        # Per-step inputs, (steps, K, Z) with policy-major rows; invalid slots read the empty
        # column (lowest key) and write to the sink column.
        x_TKZ = np.tile(np.where(valid_LQK[:, c0:c1], req_LQK[:, c0:c1], E).transpose(1, 2, 0), (1, 1, P))
        ok_TKZ = x_TKZ < E
        write_TKZ = np.where(ok_TKZ, x_TKZ, E + 1) + off_Z
        pre_TKZ = np.stack([a[:, c0:c1] for a in pre]).transpose(2, 3, 0, 1).reshape(c1 - c0, K, Z)
        post_TKZ = np.stack([a[:, c0:c1] for a in post]).transpose(2, 3, 0, 1).reshape(c1 - c0, K, Z)
        top_TK21Z = np.stack([x_TKZ, np.where(ok_TKZ, pre_TKZ, _NEG)], axis=2)[:, :, :, None, :]
        if sch_p:
            # The window slides from (t, t+n-1] to (t+1, t+n] after step t: step t+1 leaves it,
            # step t+n enters it.
            ext = np.where(valid_LQK, req_LQK, E + 1)
            leave, enter = [], []
            for p in sch_p:
                steps = np.arange(c0, c1)
                lv = np.where((steps + 1 < Q)[:, None, None], ext[:, np.minimum(steps + 1, Q - 1)].transpose(1, 2, 0), E + 1)
                en = np.where((steps + n_P[p] < Q)[:, None, None],
                              ext[:, np.minimum(steps + n_P[p], Q - 1)].transpose(1, 2, 0), E + 1)
                leave.append(lv + off_Z[p * L:(p + 1) * L])
                enter.append(en + off_Z[p * L:(p + 1) * L])
            leave_TX = np.concatenate(leave, axis=2).reshape(c1 - c0, -1)
            enter_TX = np.concatenate(enter, axis=2).reshape(c1 - c0, -1)
        for i in range(c1 - c0):
            t = c0 + i
            x_KZ = x_TKZ[i]
            if lrc:
                # Pending experts of the step count this step's use: their key + one window use.
                pending_KZ = key_flat[write_TKZ[i]] + B
            key_flat[write_TKZ[i]] = pre_TKZ[i]
            if lrc:
                key_flat[write_TKZ[i][:, lrc_Z]] = pending_KZ[:, lrc_Z]
            stack_CZ = SK_2CZ[0]
            SK_2CZ[1] = key_flat[stack_CZ + off_Z]
            eq_KCZ = stack_CZ[None] == x_KZ[:, None, :]
            pos_QKZ[t] = np.where(eq_KCZ.any(axis=1) & ok_TKZ[i], eq_KCZ.argmax(axis=1), C_max)
            for j in range(K):
                # Remove x's old entry (it becomes an empty slot), put x on top, sink running minima.
                eq_CZ = eq_KCZ[j] if j == 0 else SK_2CZ[0] == x_KZ[j]
                UK_2C1Z = np.concatenate([top_TK21Z[i, j], np.where(eq_CZ, fill_211, SK_2CZ)], axis=1)
                key_C1Z = UK_2C1Z[1]
                newmin_C1Z = key_C1Z == np.minimum.accumulate(key_C1Z, axis=0)
                arg_C1Z = np.maximum.accumulate(np.where(newmin_C1Z, j_C1, 0), axis=0)
                idx_CZ = np.where(newmin_C1Z[1:], arg_C1Z[:-1], j_C1[1:])
                SK_2CZ = UK_2C1Z.reshape(2, -1).take(idx_CZ * Z + flat_base_CZ, axis=1).reshape(2, C_max, Z)
                if lrc:  # x, now on top, takes its true key: later experts of the step may evict it
                    SK_2CZ[1, 0] = np.where(lrc_Z & ok_TKZ[i, j], post_TKZ[i, j], SK_2CZ[1, 0])
            key_flat[write_TKZ[i]] = post_TKZ[i]
            if sch_p:
                key_flat[leave_TX[i]] -= B
                key_flat[enter_TX[i]] += B

    pos_ZX = pos_QKZ.transpose(2, 0, 1).reshape(Z, -1).astype(np.int64)
    counts_ZC = np.stack([np.bincount(row[row < C_max], minlength=C_max) for row in pos_ZX]) if Z else np.zeros((0, C_max))
    hits_PLC = np.cumsum(counts_ZC, axis=1).astype(np.float64).reshape(P, L, C_max)  # hit at C iff position < C
    return StackCurves(labels, _mask_small(hits_PLC, demand_P, k_max_L), requests_L, distinct_L, k_max_L)


def _mask_small(hits_PLC: np.ndarray, demand_P: np.ndarray, k_max_L: np.ndarray) -> np.ndarray:
    """nan where a demand policy cannot run: capacity below the stream's K_max."""
    C = np.arange(1, hits_PLC.shape[2] + 1)
    hits_PLC[demand_P[:, None, None] & (C[None, None, :] < k_max_L[None, :, None])] = np.nan
    return hits_PLC
