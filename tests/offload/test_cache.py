"""Budgets, and the expert cache against the trace simulators of moekit.analysis (exact hit flags)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moekit.analysis.cache import bypass_min, simulate_lfu, simulate_lru, simulate_static
from moekit.errors import UsageError
from moekit.offload import (
    ExpertCache,
    ExpertStore,
    parse_budget,
    plan_cache,
    simulate_predictive,
    write_store,
)
from moekit.offload.budget import hot_keys_from_counts

from .conftest import tiny_lm

L, E = 3, 8


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = write_store(tiny_lm(E=E, n_layers=L), tmp_path_factory.mktemp("cache") / "store")
    with ExpertStore(path) as s:
        yield s


def test_parse_budget_forms():
    total = 1000
    assert parse_budget("25%", total) == 250
    assert parse_budget(" 12.5 % ", total) == 125
    assert parse_budget("100%", total) == 1000
    assert parse_budget(300, total) == 300
    assert parse_budget("300", total) == 300
    assert parse_budget(300.0, total) == 300 and parse_budget("3e2", total) == 300
    assert parse_budget(1, total) == 1 and parse_budget("1", total) == 1  # a bare number >= 1 is bytes
    assert parse_budget("2KiB", total) == 2048 and parse_budget("1.5MB", total) == 1_500_000
    assert parse_budget("1 GiB", total) == 2**30 and parse_budget("512mb", total) == 512 * 10**6


@pytest.mark.parametrize("budget", [300, 300.0, 4096, 1, 2.0, "7KiB", "25%"])
def test_python_and_command_line_budgets_mean_the_same(budget):
    assert parse_budget(budget, 10**6) == parse_budget(str(budget), 10**6)


@pytest.mark.parametrize("bad, match", [
    ("0%", r"\(0, 100\].*leaves no room"), ("-5%", r"\(0, 100\]"), ("150%", "more than all experts"),
    ("abc%", "not a number"), ("12 parsecs", "expected a percentage"), (0, "must be positive"),
    ("0", "must be positive"), (0.0, "must be positive"), (True, "expected a percentage"),
    (0.5, "less than one byte; for a fraction of the experts write '50%'"),
    ("0.25", "less than one byte; for a fraction of the experts write '25%'"),
    (1.5, "whole number of bytes"), ("1e999", "not a finite size"), (float("inf"), "not a finite size"),
    (float("nan"), "not a finite size"), ("nan%", "not a finite percentage"), ("1e999%", "not a finite"),
    ("-3", "expected a percentage"), ("-512MB", "is negative; expected a percentage"), ("0.5MB", None),
    ("1e308GiB", "not a finite size"), ("9e307kb", "not a finite size"), (10**400, "not a finite size"),
    ("-nanGB", "expected a percentage.*or a whole number of bytes"), ("-NaN MiB", "or a whole number of bytes"),
    ("-0", "is 0 bytes; it must be positive"), ("-0.0MB", "is 0 bytes"),  # negative zero is zero, not negative
])
def test_parse_budget_refuses_clearly(bad, match):
    if match is None:  # a unit makes a fraction meaningful
        assert parse_budget(bad, 1000) == 500_000
        return
    with pytest.raises(UsageError, match=match):
        parse_budget(bad, 1000)


def test_budget_smaller_than_one_tokens_experts_is_refused(store):
    S = store.expert_nbytes
    with pytest.raises(ValueError, match=r"holds 1 expert\(s\) of each layer's cache .* needs 2 experts .* at least "
                                         rf"{2 * L * S} bytes"):
        plan_cache(2 * L * S - 1, store, "lru", "layer", experts_per_token=2)
    assert plan_cache(2 * L * S, store, "lru", "layer", experts_per_token=2).capacity == 2
    with pytest.raises(ValueError, match="of the shared cache"):
        plan_cache(S, store, "lru", "shared", experts_per_token=2)
    assert plan_cache(2 * S, store, "lru", "shared", experts_per_token=2).capacity == 2
    with pytest.raises(ValueError, match="policy 'mru' is unknown"):
        plan_cache("50%", store, "mru")
    # More budget than experts buys no extra slots.
    assert plan_cache("100%", store, "lru", "shared").capacity == L * E


def _random_steps(rng, n, layers, K):
    """(layer, sorted expert set) steps in execution order: tokens, then layers."""
    return [(layer, sorted(rng.choice(E, size=rng.integers(1, K + 1), replace=False).tolist()))
            for _ in range(n) for layer in range(layers)]


def _drive(cache, steps):
    for layer, experts in steps:
        cache.acquire(layer, experts)
        assert cache.resident_nbytes <= cache.plan.budget_nbytes
        cache.end_step(layer)


def _stream(steps, layer=None, offset=False):
    rows = [[(lay * E if offset else 0) + e for e in ex] for lay, ex in steps if layer is None or lay == layer]
    out = np.full((len(rows), max(len(r) for r in rows)), -1)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 10**6), C=st.integers(2, 8), policy=st.sampled_from(["lru", "lfu"]),
       scope=st.sampled_from(["layer", "shared"]))
def test_cache_hits_equal_the_analysis_simulators(store, seed, C, policy, scope):
    rng = np.random.default_rng(seed)
    S = store.expert_nbytes
    budget = C * S * (L if scope == "layer" else 1)
    plan = plan_cache(budget, store, policy, scope, experts_per_token=2)
    cache = ExpertCache(store, plan)
    steps = _random_steps(rng, 12, L, 2)
    _drive(cache, steps)
    sim = simulate_lru if policy == "lru" else simulate_lfu
    logs = cache.request_log()
    if scope == "layer":
        for layer in range(L):
            assert logs[layer][0] == sim(_stream(steps, layer), C).hit_R.tolist()
    else:
        assert logs[0][0] == sim(_stream(steps, offset=True), C).hit_R.tolist()
    assert cache.peak_resident_nbytes <= budget
    cache.close()


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 10**6), C=st.integers(2, 8))
def test_static_cache_equals_simulate_static_and_keeps_the_budget(store, seed, C):
    rng = np.random.default_rng(seed)
    plan = plan_cache(C * store.expert_nbytes * L, store, "static", "layer", experts_per_token=2)
    counts_LE = rng.integers(0, 20, size=(L, E))
    hot = hot_keys_from_counts(counts_LE, plan)
    cache = ExpertCache(store, plan, hot_keys=hot)
    steps = _random_steps(rng, 12, L, 2)
    _drive(cache, steps)
    for layer in range(L):
        expect = simulate_static(_stream(steps, layer), max(C - 2, 1), np.array(hot[layer], dtype=np.int64))
        assert cache.request_log()[layer][0] == expect.hit_R.tolist()
        assert len(hot[layer]) == C - 2
    assert cache.peak_resident_nbytes <= plan.budget_nbytes


def test_static_needs_a_hot_set(store):
    with pytest.raises(ValueError, match="needs a hot set"):
        ExpertCache(store, plan_cache("50%", store, "static"))


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 10**6), C=st.integers(2, 6), scope=st.sampled_from(["layer", "shared"]))
def test_predictive_cache_equals_its_simulator_and_never_beats_bypass_min_in_loads(store, seed, C, scope):
    rng = np.random.default_rng(seed)
    S = store.expert_nbytes
    plan = plan_cache(C * S * (L if scope == "layer" else 1), store, "predictive", scope, experts_per_token=2)
    cache = ExpertCache(store, plan)
    events = [[] for _ in range(L if scope == "layer" else 1)]
    steps = _random_steps(rng, 10, L, 2)
    for layer, experts in steps:
        c, off = (layer, 0) if scope == "layer" else (0, layer * E)
        cache.acquire(layer, experts)
        events[c].append(("step", [off + e for e in experts], layer))
        if layer + 1 < L and rng.random() < 0.8:  # the runtime's order: step, next layer's prefetch, end
            guess = rng.choice(E, size=2, replace=False).tolist()
            cache.prefetch(layer + 1, guess)
            c2, off2 = (layer + 1, 0) if scope == "layer" else (0, (layer + 1) * E)
            # A per-layer cache sees the prefetch before its own next step, a shared one right here.
            events[c2].append(("prefetch", [off2 + e for e in guess], layer + 1))
        assert cache.resident_nbytes <= plan.budget_nbytes
        cache.end_step(layer)
        events[c].append(("end", [], layer))
    totals = {"prefetch_loads": 0, "useful_prefetches": 0, "wasted_prefetches": 0, "demand_loads": 0}
    for c, (hits, _) in enumerate(cache.request_log()):
        sim_hits, counters = simulate_predictive(events[c], C)
        assert hits == sim_hits.tolist()
        for k in totals:
            totals[k] += counters[k]
    cache.close()
    stats = cache.stats["prefill"]
    assert (stats.prefetch_loads, stats.useful_prefetches, stats.wasted_prefetches, stats.demand_loads) == (
        totals["prefetch_loads"], totals["useful_prefetches"], totals["wasted_prefetches"], totals["demand_loads"])
    # Prefetching turns misses into hits but never moves fewer experts than the optimal cache loads.
    streams = [_stream(steps, layer) for layer in range(L)] if scope == "layer" else [_stream(steps, offset=True)]
    min_loads = sum(int((s >= 0).sum()) - bypass_min(s, C).hits for s in streams)
    assert stats.demand_loads + stats.prefetch_loads >= min_loads


def test_loaded_weights_are_the_stored_ones(store):
    cache = ExpertCache(store, plan_cache("25%", store, "lru", "shared"))
    w = cache.acquire(2, [1, 6])
    assert torch.equal(w[1][0], store.load(2, 6)[0]) and torch.equal(w[0][1], store.load(2, 1)[1])
    cache.end_step(2)
