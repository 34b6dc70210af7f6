"""Cache simulators against straight-from-the-definition loops, exhaustive optima and the
inequalities that hold between online policies and the two optimal bounds. The paper's SCH
against its authors' code: test_sch_moe_lrc.py."""

import functools
from collections import Counter
from itertools import combinations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moekit.analysis import (
    CacheResult,
    RoutingTrace,
    bypass_min,
    layer_requests,
    model_requests,
    set_min,
    simulate_lfu,
    simulate_lru,
    simulate_sch,
    simulate_sch_keep,
    simulate_static,
    simulate_trace,
    stack_hit_curves,
)
from moekit.analysis.report import static_hits


def to_requests(rows: list[list[int]], K: int | None = None) -> np.ndarray:
    """requests_NK from per-step lists of distinct ids, padded with -1."""
    K = max([len(r) for r in rows] + [1]) if K is None else K
    out = np.full((len(rows), K), -1, dtype=np.int64)
    for t, r in enumerate(rows):
        out[t, :len(r)] = r
    return out


def random_rows(rng: np.random.Generator, T: int, E: int, K: int, skew: float = 1.0) -> list[list[int]]:
    """T steps of 0..K distinct experts each, popularity ~ p^skew (skew > 1: hotter experts)."""
    p = rng.dirichlet(np.ones(E)) ** skew
    p /= p.sum()
    return [list(rng.choice(E, size=int(rng.integers(0, K + 1)), replace=False, p=p)) for _ in range(T)]


rows_strategy = st.integers(1, 6).flatmap(lambda E: st.integers(1, min(E, 3)).flatmap(
    lambda K: st.lists(st.lists(st.integers(0, E - 1), max_size=K, unique=True), max_size=40)))


# ----------------------------------------------------------------------------- definition oracles


def reference_online(rows: list[list[int]], C: int, policy: str, n: int = 1, steps_per_token: int = 1) -> list[bool]:
    """LRU / LFU / SCH-keep exactly as worded: insert the step's experts one at a time and, on each
    overflow, evict among residents the current step does not request."""
    cache: set[int] = set()
    last_use: dict[int, int] = {}
    uses: Counter = Counter()
    clock, hits = 0, []
    lookahead = (n - 1) * steps_per_token
    for t, row in enumerate(rows):
        before = set(cache)

        def key(x, t=t):
            if policy == "lru":
                return last_use[x]
            if policy == "lfu":
                return (uses[x], last_use[x])
            future = sum(x in rows[s] for s in range(t + 1, min(t + 1 + lookahead, len(rows))))
            return (future, last_use[x])

        for e in row:
            hits.append(e in before)
            clock += 1
            last_use[e], uses[e] = clock, uses[e] + 1
            cache.add(e)
            if len(cache) > C:
                cache.remove(min((x for x in cache if x not in row), key=key))
    return hits


def exhaustive_best(rows: list[list[int]], C: int, keep_step: bool) -> int:
    """Most hits over every choice of what to keep after each step (no prefetch): any subset of
    cache + step of size <= C, or with keep_step only subsets containing the whole step."""

    @functools.cache
    def best(t: int, cache: frozenset) -> int:
        if t == len(rows):
            return 0
        step = frozenset(rows[t])
        if keep_step:
            optional = sorted(cache - step)
            options = [step | set(sub) for r in range(min(C - len(step), len(optional)) + 1)
                       for sub in combinations(optional, r)]
        else:
            pool = sorted(cache | step)
            options = [frozenset(sub) for r in range(min(C, len(pool)) + 1) for sub in combinations(pool, r)]
        return len(step & cache) + max(best(t + 1, frozenset(o)) for o in options)

    return best(0, frozenset())


def reference_min(rows: list[list[int]], C: int, keep_step: bool) -> int:
    """bypass-MIN / set-MIN hits straight from their wording, next uses found by scanning ahead."""

    def next_use(x: int, t: int) -> int:
        return next((s for s in range(t + 1, len(rows)) if x in rows[s]), len(rows))

    cache: set[int] = set()
    hits = 0
    for t, row in enumerate(rows):
        hits += len(cache & set(row))
        if keep_step:
            for e in row:
                cache.add(e)
                if len(cache) > C:
                    cache.remove(max((x for x in cache if x not in row), key=lambda x: next_use(x, t)))
        else:
            cache = set(sorted(cache | set(row), key=lambda x: next_use(x, t))[:C])
    return hits


# ----------------------------------------------------------------------------- against the definitions


@settings(max_examples=150, deadline=None)
@given(rows=rows_strategy, extra=st.integers(0, 3), n=st.integers(1, 6), spt=st.sampled_from([1, 2]))
def test_online_policies_match_definition(rows, extra, n, spt):
    req = to_requests(rows)
    C = req.shape[1] + extra
    assert simulate_lru(req, C).hit_R.tolist() == reference_online(rows, C, "lru")
    assert simulate_lfu(req, C).hit_R.tolist() == reference_online(rows, C, "lfu")
    assert simulate_sch_keep(req, C, n=n, steps_per_token=spt).hit_R.tolist() == \
        reference_online(rows, C, "sch", n=n, steps_per_token=spt)


@settings(max_examples=100, deadline=None)
@given(rows=rows_strategy, extra=st.integers(0, 3))
def test_sch_n1_is_lru(rows, extra):
    req = to_requests(rows)
    C = req.shape[1] + extra
    np.testing.assert_array_equal(simulate_sch_keep(req, C, n=1).hit_R, simulate_lru(req, C).hit_R)
    np.testing.assert_array_equal(simulate_sch(req, C, n=1).hit_R, simulate_lru(req, C).hit_R)


def test_long_streams_match_definition():
    # Long enough for the lazy heaps to be compacted many times.
    rows = random_rows(np.random.default_rng(5), 1500, 12, 3, skew=2.0)
    req = to_requests(rows, 3)
    for C in (3, 6):
        assert simulate_lfu(req, C).hit_R.tolist() == reference_online(rows, C, "lfu")
        assert simulate_sch_keep(req, C, n=5).hit_R.tolist() == reference_online(rows, C, "sch", n=5)
        assert bypass_min(req, C).hits == reference_min(rows, C, keep_step=False)
        assert set_min(req, C).hits == reference_min(rows, C, keep_step=True)


def test_sch_n1_is_lru_on_a_long_stream():
    req = to_requests(random_rows(np.random.default_rng(0), 5000, 24, 3, skew=2.0))
    for C in (3, 5, 11):
        np.testing.assert_array_equal(simulate_sch_keep(req, C, n=1).hit_R, simulate_lru(req, C).hit_R)
        np.testing.assert_array_equal(simulate_sch(req, C, n=1).hit_R, simulate_lru(req, C).hit_R)


@settings(max_examples=150, deadline=None)
@given(E=st.integers(1, 5), K=st.integers(1, 3), C=st.integers(1, 3), data=st.data())
def test_bounds_equal_exhaustive_search(E, K, C, data):
    K = min(K, E)
    rows = data.draw(st.lists(st.lists(st.integers(0, E - 1), max_size=K, unique=True), max_size=6))
    req = to_requests(rows, K)
    assert bypass_min(req, C).hits == exhaustive_best(rows, C, keep_step=False)
    k_max = max([len(r) for r in rows] + [0])
    if C >= k_max:
        assert set_min(req, C).hits == exhaustive_best(rows, C, keep_step=True)
    else:
        with pytest.raises(ValueError, match="C must be >="):
            set_min(req, C)


# ----------------------------------------------------------------------------- inequalities


def test_policies_never_beat_their_bounds():
    """On 300 random streams:
    LRU, LFU, SCH-keep <= set-MIN <= bypass-MIN (they keep every requested expert: set-MIN is the
    optimum over such schedules, and those are a subset of bypass schedules);
    static <= bypass-MIN (a static cache bypasses, so set-MIN does not bound it, see below; nor
    does it bound the paper's SCH: test_sch_moe_lrc.py);
    both bounds and LRU grow with C; warm = cold + min(C, D) for every policy."""
    rng = np.random.default_rng(0)
    for trial in range(300):
        E = int(rng.integers(2, 13))
        K = int(rng.integers(1, min(E, 3) + 1))
        rows = random_rows(rng, int(rng.integers(5, 120)), E, K, skew=float(rng.choice([1.0, 3.0])))
        req = to_requests(rows, K)
        k_max = max(len(r) for r in rows)
        D = len({e for r in rows for e in r})
        requests = sum(len(r) for r in rows)
        prev = None
        for C in range(max(k_max, 1), E + 2):
            bmin, smin = bypass_min(req, C), set_min(req, C)
            online = [simulate_lru(req, C), simulate_lfu(req, C)] + [simulate_sch_keep(req, C, n=n) for n in (2, 4, 9)]
            hot = rng.choice(E, size=min(C, E), replace=False)
            static = [simulate_static(req, C), simulate_static(req, C, hot_set=hot)]
            for r in online:
                assert r.hits <= smin.hits <= bmin.hits, trial
            for r in static:
                assert r.hits <= bmin.hits, trial
            for r in [bmin, smin, *online, *static]:
                assert r.warm_hits - r.hits == min(C, D) and r.requests == requests
                assert r.hits <= requests - D  # every first touch misses
            if prev is not None:
                assert prev[0] <= bmin.hits and prev[1] <= smin.hits and prev[2] <= online[0].hits
            prev = (bmin.hits, smin.hits, online[0].hits)


def test_static_can_beat_set_min():
    # C = 1, alternating a b a b ...: set-MIN must load every expert it serves, a static
    # cache holding only `a` lets `b` bypass. So set-MIN bounds only policies that keep the step.
    req = to_requests([[0], [1]] * 4)
    assert set_min(req, 1).hits == 0
    assert simulate_static(req, 1, hot_set=[0]).hits == 3
    assert bypass_min(req, 1).hits == 3


# ----------------------------------------------------------------------------- hand-made cases


def test_lru_and_warm_convention_by_hand():
    req = to_requests([[0], [1], [0], [2], [1]])
    r = simulate_lru(req, 2)
    assert r.hit_R.tolist() == [False, False, True, False, False]
    assert (r.hits, r.warm_hits, r.requests) == (1, 3, 5)  # first touches of 0 and 1 become warm hits
    assert r.hit_rate == pytest.approx(0.2) and r.warm_hit_rate == pytest.approx(0.6)


def test_sch_looks_ahead():
    # C = 2; at step 2 the cache {0, 1} must take 2. LRU drops 0 (oldest); SCH(2) sees 0 next.
    req = to_requests([[0], [1], [2], [0], [1]])
    assert simulate_lru(req, 2).hit_R.tolist() == [False] * 5
    assert simulate_sch(req, 2, n=2).hit_R.tolist() == [False, False, False, True, False]
    assert simulate_sch_keep(req, 2, n=2).hit_R.tolist() == [False, False, False, True, False]


def test_static_by_hand():
    req = to_requests([[0, 1], [0, 2], [0, 1], [3, -1]])
    r = simulate_static(req, 1)  # best static set {0}: first touch misses, then hits
    assert r.hit_R.tolist() == [False, False, True, False, True, False, False]
    with pytest.raises(ValueError, match="more than the capacity"):
        simulate_static(req, 1, hot_set=[0, 1])


def test_bad_inputs():
    with pytest.raises(ValueError, match="C must be >="):
        simulate_lru(to_requests([[0, 1, 2]]), 2)
    with pytest.raises(ValueError, match="same expert twice"):
        simulate_lru(np.array([[1, 1]]), 2)
    with pytest.raises(ValueError, match=">= 1"):
        bypass_min(to_requests([[0]]), 0)
    empty = simulate_lru(np.zeros((0, 2), dtype=np.int64), 2)
    assert empty.requests == 0 and empty.hits == 0


# ----------------------------------------------------------------------------- traces


def small_trace() -> RoutingTrace:
    rng = np.random.default_rng(1)
    seqs = [np.argsort(rng.random((3, T, 6)), axis=2)[:, :, :2] for T in (30, 17, 25)]
    return RoutingTrace(seqs, 6)


def test_model_requests_execution_order():
    seq = np.array([[[0, 1], [2, 3]], [[1, -1], [0, 2]]])  # (L=2, T=2, K=2)
    req = model_requests(RoutingTrace([seq], 4))
    np.testing.assert_array_equal(req, [[0, 1], [5, -1], [2, 3], [4, 6]])
    layers = layer_requests(RoutingTrace([seq, seq[:, :1]], 4))
    np.testing.assert_array_equal(layers[1], [[1, -1], [0, 2], [1, -1]])


def test_simulate_trace_sums_streams():
    trace = small_trace()
    per_layer = simulate_trace(trace, simulate_lru, 3)
    direct = [simulate_lru(r, 3) for r in layer_requests(trace)]
    assert per_layer.hits == sum(r.hits for r in direct)
    assert per_layer.warm_hits == sum(r.warm_hits for r in direct)
    assert per_layer.requests == sum(r.requests for r in direct) == 3 * 72 * 2
    shared = simulate_trace(trace, simulate_sch_keep, 8, shared=True, n=4)
    assert shared.hits == simulate_sch_keep(model_requests(trace), 8, n=4, steps_per_token=3).hits
    paper = simulate_trace(trace, simulate_sch, 8, shared=True, n=4)  # one step per token, all layers
    assert paper.hits == simulate_sch(model_requests(trace, per_token=True), 8, n=4).hits
    reset = simulate_trace(trace, set_min, 4, reset_per_sequence=True)
    singles = [simulate_trace(RoutingTrace([s], 6), set_min, 4) for s in trace.seqs]
    assert reset.hits == sum(r.hits for r in singles)
    assert simulate_trace(trace, simulate_sch_keep, 5, shared=True, n=1).hits == \
        simulate_trace(trace, simulate_lru, 5, shared=True).hits


# ----------------------------------------------------------------------------- every capacity in one pass


STACK_POLICIES = [("lru", 1), ("lfu", 1), ("sch", 2), ("sch", 5), ("sch_keep", 2), ("sch_keep", 5),
                  ("set_min", 1), ("bypass_min", 1)]


def one_capacity(req: np.ndarray, C: int, label: str) -> CacheResult:
    if label.startswith("sch_keep"):
        return simulate_sch_keep(req, C, n=int(label[8:]))
    if label.startswith("sch"):
        return simulate_sch(req, C, n=int(label[3:]))
    return {"lru": simulate_lru, "lfu": simulate_lfu, "set_min": set_min, "bypass_min": bypass_min}[label](req, C)


def random_streams(rng: np.random.Generator, L: int, N: int, E: int, K: int, skew: float) -> np.ndarray:
    """req_LNK: L streams over the same N steps, 0..K distinct experts per step."""
    out = np.full((L, N, K), -1, dtype=np.int64)
    for layer in range(L):
        rows = random_rows(rng, N, E, K, skew)
        out[layer] = to_requests(rows, K)
    return out


def test_stack_curves_equal_one_capacity_simulators():
    """Hit for hit (counts per stream) against the heap simulators at every capacity."""
    rng = np.random.default_rng(0)
    for trial in range(120):
        E = int(rng.integers(2, 10))
        K = int(rng.integers(1, min(E, 3) + 1))
        req = random_streams(rng, int(rng.integers(1, 4)), int(rng.integers(1, 70)), E, K,
                             skew=float(rng.choice([1.0, 3.0])))
        curves = stack_hit_curves(req, E, E + 1, STACK_POLICIES)
        for layer in range(req.shape[0]):
            k_max = int((req[layer] >= 0).sum(axis=1).max())
            for C in range(1, E + 2):
                for label in curves.policies:
                    got = curves.hits(label, C)[layer]
                    if (label in ("lru", "lfu", "set_min") or label.startswith("sch_keep")) and C < k_max:
                        assert np.isnan(got), (trial, label, C)
                        continue
                    ref = one_capacity(req[layer], C, label)
                    assert got == ref.hits, (trial, layer, label, C)
                    assert curves.warm_hits(label, C)[layer] == ref.warm_hits
        np.testing.assert_array_equal(curves.requests_L, (req >= 0).sum(axis=(1, 2)))


@settings(max_examples=60, deadline=None)
@given(rows=rows_strategy)
def test_stack_sch_n1_is_lru(rows):
    req = to_requests(rows)[None]
    curves = stack_hit_curves(req, 7, 8, [("lru", 1), ("sch_keep", 1), ("sch", 1)])
    np.testing.assert_array_equal(curves.hits_PLC[0], curves.hits_PLC[1])
    k_max = int(curves.k_max_L[0])  # the paper's SCH also has values below k_max; from k_max on it is LRU
    np.testing.assert_array_equal(curves.hits_PLC[0, :, max(k_max, 1) - 1:], curves.hits_PLC[2, :, max(k_max, 1) - 1:])


@settings(max_examples=100, deadline=None)
@given(E=st.integers(1, 5), K=st.integers(1, 3), data=st.data())
def test_stack_bounds_equal_exhaustive_search(E, K, data):
    K = min(K, E)
    rows = data.draw(st.lists(st.lists(st.integers(0, E - 1), max_size=K, unique=True), max_size=6))
    curves = stack_hit_curves(to_requests(rows, K)[None], E, 3, [("set_min", 1), ("bypass_min", 1)])
    k_max = max([len(r) for r in rows] + [0])
    for C in (1, 2, 3):
        assert curves.hits("bypass_min", C)[0] == exhaustive_best(rows, C, keep_step=False)
        if C >= k_max:
            assert curves.hits("set_min", C)[0] == exhaustive_best(rows, C, keep_step=True)


def test_stack_policies_never_beat_their_bounds():
    """On 300 random multi-stream traces, at every capacity: LRU, LFU, SCH-keep <= set-MIN <= bypass-MIN,
    static, SCH <= bypass-MIN, and hits never fall when C grows (all are stack algorithms)."""
    rng = np.random.default_rng(1)
    for trial in range(300):
        E = int(rng.integers(2, 14))
        K = int(rng.integers(1, min(E, 3) + 1))
        req = random_streams(rng, 2, int(rng.integers(5, 90)), E, K, skew=float(rng.choice([1.0, 3.0])))
        policies = [("lru", 1), ("lfu", 1), ("sch_keep", 3), ("sch_keep", 9), ("sch", 3), ("sch", 9),
                    ("set_min", 1), ("bypass_min", 1)]
        curves = stack_hit_curves(req, E, E + 1, policies)
        counts = np.stack([np.bincount(r[r >= 0], minlength=E) for r in req])
        for C in range(1, E + 2):
            bmin, smin = curves.hits("bypass_min", C), curves.hits("set_min", C)
            static = static_hits(counts, C)[0]
            assert np.all(static <= bmin), trial
            assert np.all(curves.hits("sch3", C) <= bmin) and np.all(curves.hits("sch9", C) <= bmin), trial
            if C < curves.k_max_L.max():
                continue
            for label in ("lru", "lfu", "sch_keep3", "sch_keep9"):
                assert np.all(curves.hits(label, C) <= smin), (trial, label, C)
            assert np.all(smin <= bmin), trial
        finite = np.where(np.isnan(curves.hits_PLC), -1, curves.hits_PLC)
        assert np.all(np.diff(finite, axis=2) >= 0), trial


def test_static_hits_equal_simulate_static():
    rng = np.random.default_rng(2)
    for _ in range(50):
        E = int(rng.integers(1, 9))
        rows = random_rows(rng, int(rng.integers(1, 40)), E, min(E, 2), skew=2.0)
        req = to_requests(rows, min(E, 2))
        counts = np.bincount(req[req >= 0], minlength=E)
        for C in range(1, E + 1):
            ref = simulate_static(req, C)
            cold, warm = static_hits(counts, C)
            assert (cold, warm) == (ref.hits, ref.warm_hits)


def test_stack_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown policy"):
        stack_hit_curves(np.zeros((1, 2, 1), dtype=np.int64), 2, 2, [("fifo", 1)])
    with pytest.raises(ValueError, match="shape"):
        stack_hit_curves(np.zeros((2, 1), dtype=np.int64), 2, 2, [("lru", 1)])
    empty = stack_hit_curves(np.zeros((2, 0, 2), dtype=np.int64), 3, 4, [("lru", 1), ("bypass_min", 1)])
    assert empty.hits("bypass_min", 2).tolist() == [0, 0] and empty.requests_L.tolist() == [0, 0]
