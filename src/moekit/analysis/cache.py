"""Expert-cache simulators over routing traces: LRU, LFU, SCH (arXiv 2505.16056, as its
authors' code computes it), SCH-keep, static, and the two optimal bounds bypass-MIN and
set-MIN (definitions: docs/analysis-metrics.md).

Legend (the analysis letters of moekit.analysis):
  Q  steps (one token of one layer)   K  expert slots per step (-1 = empty slot)
  N  valid requests, flattened in step order, row order within a step
  L  layers   E  experts per layer   C  cache capacity in experts

A request stream `requests_QK` lists, per step, the SET of expert ids it needs. Per-layer
caches see one stream per layer (steps = tokens); the whole-model cache sees one stream
of (token, layer) steps in execution order (token 0 layer 0, token 0 layer 1, ...), with
ids offset by layer * E; the paper's whole-model SCH takes one step per token holding every
layer's experts. `layer_requests`, `model_requests` and `simulate_trace` build these from a
RoutingTrace.

Conventions shared by every simulator:
  * A request is a hit iff its expert was resident before the step began.
  * Recency is the order of use: a step's experts are used in row order, after every
    earlier step's experts.
  * cold: the cache starts empty, every first touch misses.
    warm: compulsory misses while fewer than C distinct experts have been seen count as
    hits (the convention of arXiv 2505.16056). The first touches of the first min(C, n_distinct)
    distinct experts miss under every policy, so warm_hits = hits + min(C, n_distinct) for every
    policy (n_distinct = distinct experts in the stream) and both conventions order policies alike.
  * LRU, LFU, SCH-keep and set-MIN keep all of a step's experts resident (they need
    C >= K_max) and evict only experts the current step does not request; set-MIN bounds them.
  * SCH (the paper's) judges a step's requests against the cache as the step began and may
    evict an expert of the current step while inserting a later one: any C >= 1, bounded by
    bypass-MIN only (it can exceed set-MIN).

Simulations are sequential: plain Python loops over flattened request lists, with an
OrderedDict (LRU) or a lazy-deletion heap (LFU, SCH, MIN); next uses come from one
vectorised pass.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from moekit.analysis.routing_trace import RoutingTrace

__all__ = [
    "CacheResult", "RequestStream", "bypass_min", "layer_requests", "model_requests", "prepare_requests", "set_min",
    "simulate_lfu", "simulate_lru", "simulate_sch", "simulate_sch_keep", "simulate_static", "simulate_trace",
]


@dataclass(frozen=True)
class CacheResult:
    """Outcome of one simulation (or a sum of several, e.g. one cache per layer).

    hits: cold-cache hits. warm_hits: hits counting the first min(C, distinct experts)
    compulsory misses as hits. requests: valid requests. hit_N: per-request hit flags in step
    order, row order within a step (None for sums of several streams; also readable as `hit_R`,
    its name before the analysis legend gave R to bootstrap replicates).
    """

    hits: int
    warm_hits: int
    requests: int
    hit_N: np.ndarray | None = None

    @property
    def hit_R(self) -> np.ndarray | None:
        return self.hit_N

    @property
    def hit_rate(self) -> float:
        return self.hits / self.requests if self.requests else float("nan")

    @property
    def warm_hit_rate(self) -> float:
        return self.warm_hits / self.requests if self.requests else float("nan")

    def __add__(self, other: CacheResult) -> CacheResult:
        return CacheResult(self.hits + other.hits, self.warm_hits + other.warm_hits,
                           self.requests + other.requests)


# ----------------------------------------------------------------------------- stream helpers


@dataclass
class RequestStream:
    """A request stream flattened to Python lists for fast sequential loops. Every simulator accepts
    one in place of requests_QK: `prepare_requests` once, then simulate many capacities and
    policies without flattening again (next uses are computed once too)."""

    ids: list[int]        # expert id of each request
    step_N: np.ndarray    # step index of each request
    last: list[bool]      # True on the last request of its step: end-of-step work happens there
    num_steps: int
    k_max: int            # most requests in one step
    num_ids: int          # ids lie in 0..num_ids-1
    distinct: int         # distinct experts requested
    next_use: list[int] | None = None  # step of each request's next use (num_steps if none), lazily


def prepare_requests(requests_QK: np.ndarray) -> RequestStream:
    """Validate and flatten a request stream once, for several simulations."""
    return _flatten(requests_QK)


def _flatten(requests_QK: np.ndarray | RequestStream) -> RequestStream:
    if isinstance(requests_QK, RequestStream):
        return requests_QK
    r = np.asarray(requests_QK)
    if r.ndim != 2 or not np.issubdtype(r.dtype, np.integer):
        raise ValueError(f"requests_QK must be a 2-d integer array (steps, K_max), got {r.dtype} {r.shape}")
    valid = r >= 0
    if r.size and r.min() < -1:
        raise ValueError(f"expert ids must be >= 0 (or -1 for an empty slot), found {r.min()}")
    srt = np.sort(r, axis=1)
    if np.any((srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)):
        raise ValueError("a step requests the same expert twice; each step must request a set")
    step_N = np.nonzero(valid)[0]
    ids_N = r[valid].astype(np.int64)
    last_N = np.ones(ids_N.size, dtype=bool)
    last_N[:-1] = step_N[1:] != step_N[:-1]
    return RequestStream(ids_N.tolist(), step_N, last_N.tolist(), r.shape[0],
                   int(valid.sum(axis=1).max()) if r.size else 0,
                   int(ids_N.max()) + 1 if ids_N.size else 0, int(np.unique(ids_N).size))


def _next_use(st: RequestStream, never: int) -> list[int]:
    """Step of the next request of the same expert, `never` if none (one backward pass, vectorised)."""
    ids_N = np.asarray(st.ids, dtype=np.int64)
    nxt_N = np.full(ids_N.size, never, dtype=np.int64)
    if ids_N.size:
        order = np.argsort(ids_N, kind="stable")  # stable: per expert, requests stay in step order
        same = ids_N[order[1:]] == ids_N[order[:-1]]
        nxt_N[order[:-1][same]] = st.step_N[order[1:][same]]
    return nxt_N.tolist()


def _result(hit: list[bool], st: RequestStream, C: int) -> CacheResult:
    hits = int(sum(hit))
    return CacheResult(hits, hits + min(C, st.distinct), len(st.ids), np.array(hit, dtype=bool))


def _check_capacity(C: int, st: RequestStream, needs_k: bool) -> None:
    if C < 1:
        raise ValueError(f"cache capacity C must be >= 1, got {C}")
    if needs_k and C < st.k_max:
        raise ValueError(f"this policy keeps all of a step's experts resident, so C must be >= the most "
                         f"experts one step requests ({st.k_max}), got C={C}")


# ----------------------------------------------------------------------------- online policies


def simulate_lru(requests_QK: np.ndarray | RequestStream, C: int) -> CacheResult:
    """Least recently used: insert every requested expert, evict the least recently used."""
    st = _flatten(requests_QK)
    _check_capacity(C, st, needs_k=True)
    cache: OrderedDict[int, None] = OrderedDict()
    hit = []
    for e, last in zip(st.ids, st.last, strict=True):
        if e in cache:
            hit.append(True)
            cache.move_to_end(e)
        else:
            hit.append(False)
            cache[e] = None
        # NOTE: evicting at the end of the step equals evicting at each insertion: the step's
        # experts are the C >= K most recent, so the LRU victims are the same either way.
        if last:
            while len(cache) > C:
                cache.popitem(last=False)
    return _result(hit, st, C)


def simulate_lfu(requests_QK: np.ndarray | RequestStream, C: int) -> CacheResult:
    """Least frequently used: evict the resident with the fewest uses so far (counted over the
    whole stream, also before an eviction: "perfect" LFU), ties by least recent use."""
    st = _flatten(requests_QK)
    _check_capacity(C, st, needs_k=True)
    ids, B = st.ids, len(st.ids) + 1
    resident = [False] * st.num_ids
    count = [0] * st.num_ids
    last_use = [-1] * st.num_ids  # index of the expert's latest request: a total recency order
    # Heap keys are ints uses * B + request index (faster than tuples); the index names the
    # expert (ids[index]) and makes an entry stale once the expert is used again.
    heap: list[int] = []
    n_res, step_start, hit = 0, 0, []
    for i, (e, last) in enumerate(zip(ids, st.last, strict=True)):
        hit.append(resident[e])
        if not resident[e]:
            resident[e] = True
            n_res += 1
        count[e] += 1
        last_use[e] = i
        heapq.heappush(heap, count[e] * B + i)
        if not last:
            continue
        if n_res > C:  # the experts requested by this step are not evictable
            n_res = _evict_lowest_key(heap, n_res, C, B, ids, resident, last_use, None, keep_from=step_start)
        step_start = i + 1
        if len(heap) > 4 * C + 64:
            # Drop stale entries so the heap stays O(C) (inline: a function call per entry costs 2x).
            heap = [k for k in heap if last_use[ids[(u := k % B)]] == u and resident[ids[u]]]
            heapq.heapify(heap)
    return _result(hit, st, C)


def _evict_lowest_key(heap: list[int], n_res: int, C: int, B: int, ids: list[int], resident: list[bool],
                      last_use: list[int], window: list[int] | None, keep_from: int) -> int:
    """Evict until at most C experts are resident, lowest key first: keys count * B + request index
    (LFU: uses so far; SCH: window uses), so ties go to the least recent use. Entries of requests at
    or after `keep_from` are never evicted. With `window`, an outdated key (a window count that grew)
    is refreshed when popped. Returns the new resident count."""
    held = []
    while n_res > C:
        key = heapq.heappop(heap)
        w, u = divmod(key, B)
        x = ids[u]
        if not resident[x] or last_use[x] != u:
            continue
        if window is not None and window[x] != w:
            heapq.heappush(heap, window[x] * B + u)
            continue
        if u >= keep_from:
            held.append(key)
            continue
        resident[x] = False
        n_res -= 1
    for key in held:
        heapq.heappush(heap, key)
    return n_res


def simulate_sch(requests_QK: np.ndarray | RequestStream, C: int, n: int) -> CacheResult:
    """SCH(n, C), segment cache hit rate as arXiv 2505.16056 computes it (ljcleo/moe-lrc,
    src/41_sch_calc.py, `calc_fsf` with future_len = n); steps are tokens.

    Every request of a step is judged against the cache as the step began (hit iff resident).
    Then the step's experts are inserted one at a time, in row order; after each insertion, if
    more than C are resident, the resident other than the one just inserted with the lowest
    priority is evicted: priority = its uses in the window of steps t .. t+n-1 not yet processed
    (an expert of the current step that is still to be inserted counts this step's use, one that
    was inserted no longer does), ties by least recent use. So an expert the current token asked
    for can be evicted by a later expert of the same token: SCH is not bounded by set-MIN (it is
    by bypass-MIN), and it has a value for every C >= 1, also below the step's expert count.
    n = 1 equals LRU whenever C >= K_max (tested).
    """
    if n < 1:
        raise ValueError(f"segment length n must be >= 1, got {n}")
    st = _flatten(requests_QK)
    _check_capacity(C, st, needs_k=False)
    ids, step_N, N = st.ids, st.step_N.tolist(), len(st.ids)
    B = N + 1
    resident = [False] * st.num_ids
    window = [0] * st.num_ids     # unprocessed uses in steps t .. t+n-1 of the current step t
    last_use = [-1] * st.num_ids
    # Keys window * B + request index, as in simulate_sch_keep: between two uses of an expert its
    # window count only grows (it falls only when the expert itself is processed, which pushes a
    # new key), so a stored key is a lower bound, refreshed when popped.
    heap: list[int] = []
    hit = [False] * N
    n_res, hi, i = 0, 0, 0
    while i < N:
        t = step_N[i]
        end = i
        while end < N and step_N[end] == t:
            hit[end] = resident[ids[end]]  # judged against the cache as the step began
            end += 1
        while hi < N and step_N[hi] <= t + n - 1:
            window[ids[hi]] += 1
            hi += 1
        for j in range(i, end):
            e = ids[j]
            window[e] -= 1  # this use leaves the window: the request is processed
            last_use[e] = j
            if not resident[e]:
                resident[e] = True
                n_res += 1
            heapq.heappush(heap, window[e] * B + j)
            if n_res > C:  # the expert just inserted stays (moe-lrc puts it on top of its stack)
                n_res = _evict_lowest_key(heap, n_res, C, B, ids, resident, last_use, window, keep_from=j)
        i = end
        if len(heap) > 4 * C + 64:
            # Drop stale entries so the heap stays O(C) (inline: a function call per entry costs 2x).
            heap = [k for k in heap if last_use[ids[(u := k % B)]] == u and resident[ids[u]]]
            heapq.heapify(heap)
    return _result(hit, st, C)


def simulate_sch_keep(requests_QK: np.ndarray | RequestStream, C: int, n: int, steps_per_token: int = 1) -> CacheResult:
    """SCH-keep(n, C): SCH's priority (fewest uses in the next n-1 tokens, ties by least recent use)
    in a cache that, like LRU, LFU and set-MIN, never evicts an expert the current step requests,
    so every requested expert ends the step resident (C >= K_max) and SCH-keep <= set-MIN. n = 1
    is exactly LRU. This is moekit's rule before it followed the paper; the paper's SCH
    (`simulate_sch`) may evict an expert of the current token.

    The look-ahead covers the next (n-1) * steps_per_token steps; pass steps_per_token = L
    for a whole-model stream, whose steps are (token, layer) pairs (simulate_trace does).
    """
    if n < 1:
        raise ValueError(f"segment length n must be >= 1, got {n}")
    st = _flatten(requests_QK)
    _check_capacity(C, st, needs_k=True)
    ids, step_N, N = st.ids, st.step_N.tolist(), len(st.ids)
    B = N + 1
    lookahead = (n - 1) * steps_per_token
    resident = [False] * st.num_ids
    window = [0] * st.num_ids     # uses in steps t+1 .. t+lookahead of the current step t
    last_use = [-1] * st.num_ids
    # Keys window * B + request index, as in simulate_lfu. NOTE: between two uses of an expert
    # its window count only grows (a use leaves the window only at the step that makes it), so
    # a stored key never exceeds the true one: an outdated entry is re-pushed when popped
    # ("lazy increase-key") instead of pushing on every window change.
    heap: list[int] = []
    n_res, step_start, lo, hi, hit = 0, 0, 0, 0, []
    for i, (e, last) in enumerate(zip(ids, st.last, strict=True)):
        hit.append(resident[e])
        if not resident[e]:
            resident[e] = True
            n_res += 1
        last_use[e] = i
        if not last:
            continue
        # Slide the look-ahead window to (t, t + lookahead]: requests [lo, hi) lie inside it.
        t = step_N[i]
        while hi < N and step_N[hi] <= t + lookahead:
            window[ids[hi]] += 1
            hi += 1
        while lo < N and step_N[lo] <= t:
            window[ids[lo]] -= 1
            lo += 1
        for j in range(step_start, i + 1):
            heapq.heappush(heap, window[ids[j]] * B + j)
        if n_res > C:  # the experts requested by this step are not evictable
            n_res = _evict_lowest_key(heap, n_res, C, B, ids, resident, last_use, window, keep_from=step_start)
        step_start = i + 1
        if len(heap) > 4 * C + 64:
            # Drop stale entries so the heap stays O(C) (inline: a function call per entry costs 2x).
            heap = [k for k in heap if last_use[ids[(u := k % B)]] == u and resident[ids[u]]]
            heapq.heapify(heap)
    return _result(hit, st, C)


def simulate_static(requests_QK: np.ndarray | RequestStream, C: int, hot_set: np.ndarray | None = None) -> CacheResult:
    """Static cache: only the experts of `hot_set` (at most C) are ever cached, filled on first
    use and never evicted; others bypass. hot_set=None takes the C most requested experts of
    this stream (ties to the lower id): the best static set, an oracle."""
    st = _flatten(requests_QK)
    _check_capacity(C, st, needs_k=False)
    ids_N = np.asarray(st.ids, dtype=np.int64)
    if hot_set is None:
        freq = np.bincount(ids_N, minlength=st.num_ids)
        hot_set = np.argsort(-freq, kind="stable")[:C]
    hot_set = np.unique(np.asarray(hot_set, dtype=np.int64))
    if hot_set.size > C:
        raise ValueError(f"hot_set has {hot_set.size} experts, more than the capacity C={C}")
    first = np.zeros(ids_N.size, dtype=bool)
    first[np.unique(ids_N, return_index=True)[1]] = True
    hit_N = np.isin(ids_N, hot_set) & ~first  # cold: the first touch of a hot expert still misses
    return CacheResult(int(hit_N.sum()), int(hit_N.sum()) + min(C, st.distinct), ids_N.size, hit_N)


# ----------------------------------------------------------------------------- optimal bounds


def _min_policy(requests_QK: np.ndarray | RequestStream, C: int, protect_step: bool) -> CacheResult:
    """Belady-style furthest-next-use eviction; protect_step keeps the step's experts (set-MIN)."""
    st = _flatten(requests_QK)
    _check_capacity(C, st, needs_k=protect_step)
    ids, B = st.ids, len(st.ids) + 1
    if st.next_use is None:
        st.next_use = _next_use(st, never=st.num_steps)  # "no next use" sorts after every real step
    nxt = st.next_use
    resident = [False] * st.num_ids
    last_use = [-1] * st.num_ids
    # Max-heap on next use via negated int keys -(next use * B + request index); the index
    # names the expert and makes the entry stale once the expert is used again.
    heap: list[int] = []
    n_res, step_start, hit = 0, 0, []
    for i, (e, last, nu) in enumerate(zip(ids, st.last, nxt, strict=True)):
        hit.append(resident[e])
        if not resident[e]:
            resident[e] = True
            n_res += 1
        last_use[e] = i
        heapq.heappush(heap, -(nu * B + i))
        if not last:
            continue
        held = []
        while n_res > C:
            key = heapq.heappop(heap)
            u = -key % B
            x = ids[u]
            if not resident[x] or last_use[x] != u:
                continue
            if protect_step and u >= step_start:  # set-MIN: requested by this step, keep it
                held.append(key)
                continue
            resident[x] = False
            n_res -= 1
        for key in held:
            heapq.heappush(heap, key)
        step_start = i + 1
        if len(heap) > 4 * C + 64:
            heap = [k for k in heap if last_use[ids[(u := -k % B)]] == u and resident[ids[u]]]
            heapq.heapify(heap)
    return _result(hit, st, C)


def bypass_min(requests_QK: np.ndarray | RequestStream, C: int) -> CacheResult:
    """Optimal hits when experts may bypass the cache: after each step keep, among the cache and
    the step's experts, the C whose next use is soonest. Bounds every policy whose cache after a
    step is a subset of (cache before it) + (the step's experts), bypassing or not: LRU, LFU,
    SCH, SCH-keep, static."""
    return _min_policy(requests_QK, C, protect_step=False)


def set_min(requests_QK: np.ndarray | RequestStream, C: int) -> CacheResult:
    """Optimal hits when all of a step's experts must be resident (C >= K_max): Belady, evicting
    among residents not requested by the step the one used furthest in the future. Bounds
    LRU, LFU, SCH-keep and any other policy that keeps every requested expert - not the paper's
    SCH, which may evict a requested expert and can exceed it."""
    return _min_policy(requests_QK, C, protect_step=True)


# ----------------------------------------------------------------------------- traces


def _pad(a_xK: np.ndarray, K: int) -> np.ndarray:
    if a_xK.shape[-1] == K:
        return a_xK
    pad = np.full((*a_xK.shape[:-1], K - a_xK.shape[-1]), -1, dtype=a_xK.dtype)
    return np.concatenate([a_xK, pad], axis=-1)


def layer_requests(trace: RoutingTrace, seq_idx: list[int] | None = None) -> list[np.ndarray]:
    """One request stream per layer, requests_QK with the sequences concatenated in order."""
    seqs = [trace.seqs[i] for i in (range(len(trace.seqs)) if seq_idx is None else seq_idx)]
    K = max(s.shape[2] for s in seqs)
    return [np.concatenate([_pad(s[layer], K) for s in seqs]) for layer in range(trace.num_layers)]


def model_requests(trace: RoutingTrace, seq_idx: list[int] | None = None, per_token: bool = False) -> np.ndarray:
    """The whole-model stream, ids offset by layer * E: steps (token, layer) in execution order,
    (T * L, K); per_token=True: one step per token with every layer's experts in layer order,
    (T, L * K), as the paper's whole-model SCH concatenates the layers (ljcleo/moe-lrc)."""
    seqs = [trace.seqs[i] for i in (range(len(trace.seqs)) if seq_idx is None else seq_idx)]
    K, L, E = max(s.shape[2] for s in seqs), trace.num_layers, trace.num_experts
    parts = []
    for s in seqs:
        offset = np.where(s >= 0, s + (np.arange(L) * E)[:, None, None], -1)
        parts.append(_pad(offset.transpose(1, 0, 2), K).reshape(-1, K))  # (T, L, K) -> (T*L, K)
    steps = np.concatenate(parts)
    return steps.reshape(-1, L * K) if per_token else steps


def simulate_trace(trace: RoutingTrace, simulator: Callable[..., CacheResult], C: int, *,
                   shared: bool = False, reset_per_sequence: bool = False, **kwargs) -> CacheResult:
    """Run `simulator(requests_QK, C, **kwargs)` on a trace and sum the results.

    shared=False: one cache of C experts per layer. shared=True: one cache of C experts for the
    whole model. By default the cache persists from one sequence to the next (a server handling
    requests in trace order); reset_per_sequence=True starts every sequence with an empty cache
    (the warm convention then applies per sequence). The paper's SCH on the whole model takes one
    step per token (`model_requests(per_token=True)`); SCH-keep's look-ahead covers n-1 tokens of
    (token, layer) steps.
    """
    if shared and simulator is simulate_sch_keep:
        # SCH-keep's look-ahead is in tokens; a whole-model step is one (token, layer) pair.
        kwargs.setdefault("steps_per_token", trace.num_layers)
    per_token = simulator is simulate_sch
    groups = [[i] for i in range(len(trace.seqs))] if reset_per_sequence else [None]
    total = CacheResult(0, 0, 0)
    for idx in groups:
        streams = [model_requests(trace, idx, per_token)] if shared else layer_requests(trace, idx)
        for req in streams:
            total = total + simulator(req, C, **kwargs)
    return total
