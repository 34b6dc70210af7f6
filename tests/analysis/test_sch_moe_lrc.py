"""SCH against its authors' code: a transcription of ljcleo/moe-lrc's `calc_fsf` (src/41_sch_calc.py,
commit 7b3ca46, the code behind arXiv 2505.16056's SCH figures), a plain per-capacity simulation
from the wording, the hand-checked example of issue 11, and what SCH is (not) bounded by.

`moe_lrc_calc_fsf` below is moe-lrc's function with only these edits: `seq` is a list of lists of
ids instead of a (T, k) tensor (so steps may hold 0..k experts), `seq.shape[0]` -> `len(seq)`,
`expert.item()` -> `expert`, and it returns `stat` (hits by stack position; compulsory misses
counted at the number of distinct experts seen before) instead of `cumsum(stat) / numel`.
moe-lrc's value at cache size C is `sum(stat[:C]) / requests`: the warm convention.

moe-lrc is MIT licensed: Copyright (c) 2025 Leo Liang. Permission is hereby granted, free of
charge, to any person obtaining a copy of this software and associated documentation files (the
"Software"), to deal in the Software without restriction, including without limitation the rights
to use, copy, modify, merge, publish, distribute, sublicense, and/or sell copies of the Software,
and to permit persons to whom the Software is furnished to do so, subject to the following
conditions: The above copyright notice and this permission notice shall be included in all copies
or substantial portions of the Software. THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY
KIND, EXPRESS OR IMPLIED.
"""

import numpy as np
import pytest

from moekit.analysis import (
    RoutingTrace,
    bypass_min,
    model_requests,
    set_min,
    simulate_lru,
    simulate_sch,
    simulate_sch_keep,
    simulate_trace,
    stack_hit_curves,
)

from .test_cache import to_requests

# ruff: noqa: E501  (the transcription keeps moe-lrc's lines)


def moe_lrc_calc_fsf(seq: list[list[int]], num_experts: int, future_len: int) -> list[int]:
    f_mask: int = 0xFFFFFFFF00000000
    f_offset: int = 0x100000000
    ts: int = 0
    x: int

    prop: list[int] = [0 for _ in range(num_experts)]
    stat: list[int] = [0 for _ in range(num_experts)]
    rank: list[int] = [num_experts for _ in range(num_experts)]
    prv: list[int] = list(range(num_experts + 1))
    nxt: list[int] = list(range(num_experts + 1))
    hdp: list[int] = list(range(num_experts + 1))
    hdn: list[int] = list(range(num_experts + 1))
    uni: int = 0

    for i in range(min(future_len, len(seq))):
        for expert in seq[i]:
            x = expert
            prop[x] += f_offset

    for i, batch in enumerate(seq):
        p: int = nxt[num_experts]
        c: int = 0

        while p != num_experts:
            rank[p] = c
            p = nxt[p]
            c += 1

        for expert in batch:
            x = expert
            pos: int = rank[x]

            if pos == num_experts:
                stat[uni] += 1
                uni += 1
            else:
                stat[pos] += 1

        for expert in batch:
            x = expert
            q: int

            if nxt[x] == x:
                q = num_experts
            else:
                if hdn[x] != -1:
                    q = x
                else:
                    p1: int = x
                    p2: int = nxt[x]

                    while hdn[p1] == -1 and hdn[p2] == -1:
                        p1 = prv[p1]
                        p2 = nxt[p2]

                    p = hdp[p2] if hdn[p1] == -1 else p1
                    q = hdn[p]
                    hdn[p] = x
                    hdp[x] = p
                    hdn[x] = q
                    hdp[q] = x
                    q = x

            p = hdn[num_experts]

            while p != num_experts and p != q and hdn[p] != num_experts and hdn[p] != q:
                c = prv[hdn[p]]
                r: int = hdn[p]

                while hdn[r] != num_experts and hdn[r] != q and prop[prv[hdn[r]]] > prop[c]:
                    r = hdn[r]

                assert prop[r] > prop[c]

                d1: int = r
                d2: int = hdn[r]

                while (
                    hdn[nxt[d1]] == -1
                    and prop[nxt[d1]] > prop[c]
                    and hdn[prv[d2]] == -1
                    and prop[prv[d2]] < prop[c]
                ):
                    d1 = nxt[d1]
                    d2 = prv[d2]

                d: int = prv[d2] if hdn[nxt[d1]] == -1 and prop[nxt[d1]] > prop[c] else d1

                a: int = prv[c]
                b: int = nxt[c]
                nxt[a] = b
                prv[b] = a

                if hdn[c] != -1:
                    s: int = hdp[c]
                    t: int = hdn[c]
                    hdn[s] = t
                    hdp[t] = s
                    hdp[c] = hdn[c] = -1

                if a != num_experts and b != num_experts and prop[a] > prop[b]:
                    assert hdn[b] != -1
                    s: int = hdp[b]
                    t: int = hdn[b]
                    hdn[s] = t
                    hdp[t] = s
                    hdp[b] = hdn[b] = -1

                    if r == b:
                        r = s

                a = nxt[d]
                nxt[d] = c
                prv[c] = d
                nxt[c] = a
                prv[a] = c
                p = r

            if nxt[x] != x:
                a: int = prv[x]
                b: int = nxt[x]
                nxt[a] = b
                prv[b] = a
                assert hdn[x] != -1
                c = hdp[x]
                d: int = hdn[x]

                if d == b:
                    if a != num_experts and b != num_experts and prop[a] > prop[b]:
                        a = hdn[d]
                        hdn[c] = a
                        hdp[a] = c
                        hdp[d] = hdn[d] = -1
                    else:
                        hdn[c] = d
                        hdp[d] = c
                else:
                    assert hdn[b] == -1

                    if a != num_experts and b != num_experts and prop[a] > prop[b]:
                        hdn[c] = d
                        hdp[d] = c
                    else:
                        hdn[c] = b
                        hdp[b] = c
                        hdn[b] = d
                        hdp[d] = b

                hdp[x] = hdn[x] = -1

            q = nxt[num_experts]
            nxt[num_experts] = x
            prv[x] = num_experts
            nxt[x] = q
            prv[q] = x
            assert hdn[num_experts] == q
            hdn[num_experts] = x
            hdp[x] = num_experts

            ts += 1
            prop[x] = ((prop[x] & f_mask) - f_offset) | ts

            if q != num_experts and prop[x] > prop[q]:
                c = hdn[q]
                hdn[x] = c
                hdp[c] = x
                hdp[q] = hdn[q] = -1
            else:
                hdn[x] = q
                hdp[q] = x

        if i + future_len < len(seq):
            for expert in seq[i + future_len]:
                x = expert
                prop[x] += f_offset

                if prv[x] != num_experts and hdn[x] == -1 and prop[prv[x]] < prop[x]:
                    p1: int = x
                    p2: int = nxt[x]

                    while hdn[p1] == -1 and hdn[p2] == -1:
                        p1 = prv[p1]
                        p2 = nxt[p2]

                    p = hdp[p2] if hdn[p1] == -1 else p1
                    q: int = hdn[p]
                    hdn[p] = x
                    hdp[x] = p
                    hdn[x] = q
                    hdp[q] = x

                if nxt[x] != num_experts and hdn[nxt[x]] != -1 and prop[x] > prop[nxt[x]]:
                    p = hdp[nxt[x]]
                    q: int = nxt[x]
                    r: int = hdn[q]
                    hdn[p] = r
                    hdp[r] = p
                    hdp[q] = hdn[q] = -1

    return stat  # moe-lrc: torch.tensor(stat).cumsum(0) / seq.numel()


# ----------------------------------------------------------------------------- helpers


def random_rows(rng: np.random.Generator, T: int, E: int, K: int, fixed_k: bool) -> list[list[int]]:
    """T steps of K (fixed_k) or 0..K distinct experts, skewed popularity."""
    p = rng.dirichlet(np.ones(E)) ** 2
    p /= p.sum()
    return [[int(e) for e in rng.choice(E, size=K if fixed_k else int(rng.integers(0, K + 1)), replace=False, p=p)]
            for _ in range(T)]


def moe_lrc_warm_hits(rows: list[list[int]], E: int, n: int) -> list[int]:
    """moe-lrc's SCH numerator at every cache size C = 1..E (warm convention)."""
    return np.cumsum(moe_lrc_calc_fsf(rows, E, n)).tolist()


def sch_from_wording(rows: list[list[int]], C: int, n: int) -> list[bool]:
    """SCH(n, C) as docs/analysis-metrics.md words it, by brute force: hits judged against the cache
    as the token began; the token's experts inserted one at a time; on overflow evict, among the
    residents other than the one just inserted, the fewest unprocessed uses in tokens t .. t+n-1,
    ties by least recent use."""
    cache: set[int] = set()
    last_use: dict[int, int] = {}
    clock, hits = 0, []
    for t, row in enumerate(rows):
        hits.extend(e in cache for e in row)
        for j, e in enumerate(row):
            clock += 1
            last_use[e] = clock
            cache.add(e)
            pending = set(row[j + 1:])

            def key(x, t=t, pending=pending):
                future = sum(x in rows[s] for s in range(t + 1, min(t + n, len(rows))))
                return (future + (x in pending), last_use[x])

            if len(cache) > C:
                cache.remove(min((x for x in cache if x != e), key=key))
    return hits


# ----------------------------------------------------------------------------- the hand-checked example


def test_issue_example_by_hand():
    # 1 layer, E = 3, tokens [2] [0, 1] [2], C = 2, n = 2. Token 1 inserts 0 then 1; with 1 the cache
    # {2, 0, 1} overflows and SCH evicts 0 (no use in the next token) although token 1 asked for it,
    # so token 2 hits expert 2: 1 hit of 4 requests (cold 0.25), + min(C, 3) = 2 warm (0.75).
    rows = [[2], [0, 1], [2]]
    req = to_requests(rows)
    r = simulate_sch(req, 2, n=2)
    assert r.hit_R.tolist() == [False, False, False, True]
    assert (r.hit_rate, r.warm_hit_rate) == (0.25, 0.75)
    assert moe_lrc_warm_hits(rows, 3, 2)[1] / 4 == 0.75
    # moekit's earlier rule (kept as SCH-keep) never evicts a requested expert: 0.0 / 0.5.
    keep = simulate_sch_keep(req, 2, n=2)
    assert (keep.hit_rate, keep.warm_hit_rate) == (0.0, 0.5)
    # set-MIN must keep 0 and 1 resident through token 1: 0 hits. SCH exceeds it; bypass-MIN bounds it.
    assert set_min(req, 2).hits == 0 < r.hits <= bypass_min(req, 2).hits == 1


# ----------------------------------------------------------------------------- against moe-lrc


def test_sch_equals_moe_lrc_on_random_traces():
    """Every cache size 1..E, fixed k (as moe-lrc runs it) and 0..K experts per token."""
    rng = np.random.default_rng(0)
    for trial in range(200):
        E = int(rng.integers(1, 10))
        K = int(rng.integers(1, min(E, 4) + 1))
        n = int(rng.integers(1, 9))
        rows = random_rows(rng, int(rng.integers(0, 45)), E, K, fixed_k=trial % 2 == 0)
        requests = sum(len(r) for r in rows)
        if requests == 0:
            continue
        ref = moe_lrc_warm_hits(rows, E, n)
        req = to_requests(rows, K)
        D = len({e for r in rows for e in r})
        for C in range(1, E + 1):
            r = simulate_sch(req, C, n=n)
            assert r.warm_hits == ref[C - 1], (trial, C)
            assert r.hits == ref[C - 1] - min(C, D)
            assert r.hit_R.tolist() == sch_from_wording(rows, C, n), (trial, C)
        curves = stack_hit_curves(req[None], E, E, [("sch", n)])
        assert curves.warm_hits(f"sch{n}", 1).tolist() == [ref[0]]
        assert [int(curves.warm_hits(f"sch{n}", C)[0]) for C in range(1, E + 1)] == ref, trial


def test_whole_model_sch_equals_moe_lrc():
    """moe-lrc's whole-model SCH concatenates the layers' experts of a token (ids offset by
    layer * E) into one step, one sequence at a time, and averages the sequences' rates."""
    rng = np.random.default_rng(1)
    L, E, K, n = 3, 5, 2, 4
    seqs = [np.stack([to_requests(random_rows(rng, T, E, K, fixed_k=True), K) for _ in range(L)])
            for T in (9, 14, 1)]
    trace = RoutingTrace(seqs, E)
    warm = 0
    for s in seqs:
        rows = [[int(layer * E + e) for layer in range(L) for e in s[layer, t]] for t in range(s.shape[1])]
        ref = moe_lrc_warm_hits(rows, L * E, n)
        one = simulate_trace(RoutingTrace([s], E), simulate_sch, 6, shared=True, n=n)
        assert one.warm_hits == ref[5] and one.requests == len(rows) * L * K
        warm += one.warm_hits
    per_token = model_requests(trace, per_token=True)
    assert per_token.shape == (9 + 14 + 1, L * K)
    assert simulate_trace(trace, simulate_sch, 6, shared=True, n=n).hits == simulate_sch(per_token, 6, n=n).hits
    reset = simulate_trace(trace, simulate_sch, 6, shared=True, n=n, reset_per_sequence=True)
    assert reset.warm_hits == warm


# ----------------------------------------------------------------------------- bounds and special cases


def test_sch_bounded_by_bypass_min_not_set_min():
    """On random streams: SCH <= bypass-MIN at every C >= 1; SCH-keep <= set-MIN; SCH > set-MIN
    somewhere (so no report may call set-MIN its bound); n = 1 equals LRU when C >= k_max."""
    rng = np.random.default_rng(2)
    above_set_min = 0
    for _ in range(100):
        E = int(rng.integers(2, 10))
        K = int(rng.integers(1, min(E, 3) + 1))
        rows = random_rows(rng, int(rng.integers(5, 80)), E, K, fixed_k=False)
        req = to_requests(rows, K)
        k_max = max(len(r) for r in rows)
        for C in range(1, E + 1):
            bmin = bypass_min(req, C).hits
            for n in (1, 3, 8):
                sch = simulate_sch(req, C, n=n).hits
                assert sch <= bmin
                if C >= k_max:
                    smin = set_min(req, C).hits
                    assert simulate_sch_keep(req, C, n=n).hits <= smin
                    above_set_min += sch > smin
            if C >= k_max:
                np.testing.assert_array_equal(simulate_sch(req, C, n=1).hit_R, simulate_lru(req, C).hit_R)
    assert above_set_min > 0


def test_sch_below_the_tokens_expert_count():
    # C = 1 with two experts per token: every insertion evicts the previous one; a request hits only
    # if its expert was the last one inserted (and it is asked for again first in the next token).
    rows = [[0, 1], [1, 0], [1, 2], [2]]
    r = simulate_sch(to_requests(rows), 1, n=2)
    assert r.hit_R.tolist() == sch_from_wording(rows, 1, 2) == [False, False, True, False, False, False, True]
    assert r.warm_hits == moe_lrc_warm_hits(rows, 3, 2)[0]
    with pytest.raises(ValueError, match="C must be >="):
        simulate_sch_keep(to_requests(rows), 1, n=2)
