"""Routing metrics against hand-made traces with known answers and straight-from-the-definition loops."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moekit.analysis import (
    RoutingTrace,
    affinity,
    affinity_prefetch_recall,
    coefficient_of_variation,
    domain_distributions,
    domain_divergence,
    entropy,
    expert_counts,
    experts_per_token,
    experts_per_token_by_domain,
    gini,
    js_divergence,
    load_stats,
    srp,
    srp_bootstrap,
    srp_random_baseline,
    static_hot_set,
)


def random_seq(rng: np.random.Generator, L: int, T: int, E: int, K: int, dynamic: bool = True) -> np.ndarray:
    """experts_LTK with K distinct experts per token, some slots padded with -1 when dynamic."""
    out = np.argsort(rng.random((L, T, E)), axis=2)[:, :, :K]
    if dynamic:
        out = np.where(rng.random((L, T, K)) < 0.3, -1, out)
    return out


def random_trace(seed: int, L: int = 2, E: int = 5, K: int = 2, S: int = 3, T_max: int = 12,
                 dynamic: bool = True) -> RoutingTrace:
    rng = np.random.default_rng(seed)
    seqs = [random_seq(rng, L, int(rng.integers(0, T_max + 1)), E, K, dynamic) for _ in range(S)]
    return RoutingTrace(seqs, E)


# ----------------------------------------------------------------------------- SRP oracle


def brute_srp(trace: RoutingTrace, n: int, unit: str):
    """SRP straight from its definition (docs/analysis-metrics.md): enumerate windows, thresholds and groups one by one."""
    L, E = trace.num_layers, trace.num_experts
    units = [(layer, e) for layer in range(L) for e in range(E)]
    # per unit key and tau: [matches, preds, acts]
    sums: dict = {}
    for s in trace.seqs:
        T = s.shape[1]
        for layer, e in units:
            for start in range(T - n + 1):
                window = s[layer, start:start + n]
                c = {x: int(np.sum(window == x)) for x in range(E)}
                key = {"layer": layer, "model": 0, "expert": (layer, e)}[unit]
                for tau in range(n + 1):
                    acc = sums.setdefault((key, tau), [0, 0, 0])
                    group = {x for x in range(E) if c[x] >= tau}
                    # each expert of the unit contributes its own column of the window
                    acc[0] += c[e] if e in group else 0
                    acc[1] += n if e in group else 0
                    acc[2] += c[e]

    def best(key):
        f1 = []
        for tau in range(n + 1):
            m, p, a = sums.get((key, tau), [0, 0, 0])
            if a > 0:
                f1.append(2 * m / (p + a))
        return max(f1) if f1 else math.nan

    if unit == "model":
        return best(0)
    if unit == "layer":
        return np.array([best(layer) for layer in range(L)])
    return np.array([[best((layer, e)) for e in range(E)] for layer in range(L)])


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 5), unit=st.sampled_from(["layer", "model", "expert"]))
def test_srp_matches_brute_force(seed, n, unit):
    trace = random_trace(seed)
    np.testing.assert_allclose(srp(trace, n, unit), brute_srp(trace, n, unit), rtol=1e-12, equal_nan=True)


def test_srp_constant_routing_is_one():
    seq = np.tile(np.array([[1, 3]]), (40, 1))[None].repeat(3, axis=0)  # (L=3, T=40, K=2)
    trace = RoutingTrace([seq, seq[:, :17]], 6)
    for n in (1, 4, 16):
        np.testing.assert_allclose(srp(trace, n, "layer"), 1.0)
        assert srp(trace, n, "model") == pytest.approx(1.0)
        per_expert = srp(trace, n, "expert")
        np.testing.assert_allclose(per_expert[:, [1, 3]], 1.0)
        assert np.all(np.isnan(per_expert[:, [0, 2, 4, 5]]))  # never used: no positives


def test_srp_is_at_least_random_baseline_and_close_for_random_routing():
    # tau = 0 predicts every expert and scores exactly 2k/(E+k) for fixed k.
    rng = np.random.default_rng(0)
    E, k = 16, 2
    trace = RoutingTrace([random_seq(rng, 2, 400, E, k, dynamic=False) for _ in range(3)], E)
    base = srp_random_baseline(k, E)
    for n in (4, 64):
        assert np.all(srp(trace, n, "layer") >= base - 1e-12)
    assert srp(trace, 64, "model") == pytest.approx(base, abs=0.03)


def test_srp_sequences_shorter_than_n_have_no_window():
    trace = RoutingTrace([np.zeros((1, 3, 1), dtype=np.int64)], 2)
    assert np.isnan(srp(trace, 4, "layer")).all()
    assert math.isnan(srp(trace, 4, "model"))


def test_srp_bootstrap():
    trace = random_trace(3, S=12, T_max=30)
    value, lo, hi = srp_bootstrap(trace, 4, "layer", n_boot=100, seed=1)
    np.testing.assert_allclose(value, srp(trace, 4, "layer"))
    assert np.all(lo <= hi)
    again = srp_bootstrap(trace, 4, "layer", n_boot=100, seed=1)
    np.testing.assert_array_equal(again[1], lo)
    m_value, m_lo, m_hi = srp_bootstrap(trace, 4, "model", n_boot=50)
    assert m_value == pytest.approx(srp(trace, 4, "model")) and m_lo <= m_hi
    e_value, e_lo, e_hi = srp_bootstrap(trace, 2, "expert", n_boot=20)
    assert e_value.shape == e_lo.shape == (trace.num_layers, trace.num_experts)
    # identical sequences: every resample gives the same counts up to scale, so a zero-width interval
    same = RoutingTrace([trace.seqs[0]] * 5, trace.num_experts)
    v, lo, hi = srp_bootstrap(same, 2, "model", n_boot=20)
    if not math.isnan(v):
        assert lo == pytest.approx(v) and hi == pytest.approx(v)


def test_srp_rejects_bad_unit():
    with pytest.raises(ValueError, match="unit"):
        srp(random_trace(0), 2, "token")


# ----------------------------------------------------------------------------- load and skew


def test_balanced_load():
    E = 4
    seq = np.tile(np.arange(E), 3)[:, None]  # (T=12, K=1) cycling over the experts
    trace = RoutingTrace([np.stack([seq, seq[::-1]])], E)
    stats = load_stats(trace)
    np.testing.assert_array_equal(stats.counts_LE, np.full((2, E), 3))
    np.testing.assert_allclose(stats.cv_L, 0.0)
    np.testing.assert_allclose(stats.gini_L, 0.0, atol=1e-12)
    np.testing.assert_allclose(stats.norm_entropy_L, 1.0)
    np.testing.assert_allclose(stats.entropy_L, math.log(E))
    np.testing.assert_allclose(stats.max_over_mean_L, 1.0)


def test_collapsed_load():
    E = 8
    trace = RoutingTrace([np.zeros((1, 50, 1), dtype=np.int64)], E)
    stats = load_stats(trace)
    assert stats.cv_L[0] == pytest.approx(math.sqrt(E - 1))
    assert stats.gini_L[0] == pytest.approx((E - 1) / E)
    assert stats.entropy_L[0] == pytest.approx(0.0)
    assert stats.norm_entropy_L[0] == pytest.approx(0.0)
    assert stats.max_over_mean_L[0] == pytest.approx(E)


def test_scalar_helpers_match_textbook_formulas():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 20, size=9).astype(float)
    pairwise = np.abs(x[:, None] - x[None, :]).sum() / (2 * x.size**2 * x.mean())
    assert gini(x) == pytest.approx(pairwise)
    assert coefficient_of_variation(x) == pytest.approx(x.std() / x.mean())
    p = x / x.sum()
    assert entropy(x) == pytest.approx(-(p[p > 0] * np.log(p[p > 0])).sum())
    assert js_divergence(x, x) == pytest.approx(0.0, abs=1e-12)
    assert js_divergence([1, 0], [0, 1]) == pytest.approx(math.log(2))


def test_static_hot_set():
    seq = np.array([[[0], [0], [0], [1], [1], [2]], [[3], [3], [2], [2], [2], [2]]])  # (L=2, T=6, K=1)
    trace = RoutingTrace([seq], 4)
    hot, bound = static_hot_set(trace, 2)
    np.testing.assert_array_equal(hot, [[0, 1], [2, 3]])
    np.testing.assert_allclose(bound, [5 / 6, 1.0])
    hot_m, bound_m = static_hot_set(trace, 2, unit="model")
    np.testing.assert_array_equal(hot_m, [4 + 2, 0])  # layer-1 expert 2 (4 uses), layer-0 expert 0 (3)
    assert float(bound_m) == pytest.approx(7 / 12)


# ----------------------------------------------------------------------------- experts per token, domains


def test_experts_per_token_with_padding():
    seq = np.array([[[0, 1], [2, -1], [-1, -1], [3, 0]]])  # k = 2, 1, 0, 2
    other = np.array([[[1, -1]]])
    trace = RoutingTrace([seq, other], 4, domains=["code", "math"])
    mean, hist = experts_per_token(trace)
    np.testing.assert_array_equal(hist, [[1, 2, 2]])
    assert mean[0] == pytest.approx(6 / 5)
    by = experts_per_token_by_domain(trace)
    np.testing.assert_array_equal(by["code"][1], [[1, 1, 2]])
    assert by["math"][0][0] == pytest.approx(1.0)
    np.testing.assert_array_equal(expert_counts(trace), [[2, 2, 1, 1]])


def test_disjoint_domains_have_js_ln2():
    code = np.array([[[0, 1], [1, 0]], [[2, -1], [2, -1]]])  # (L=2, T=2, K=2)
    math_ = np.array([[[2, 3], [3, -1]], [[0, 1], [1, 3]]])
    trace = RoutingTrace([code, math_, code], 4, domains=["code", "math", "code"])
    names, js = domain_divergence(trace)
    assert names == ["code", "math"]
    np.testing.assert_allclose(js[0, 1], math.log(2))
    np.testing.assert_allclose(js[1, 0], math.log(2))
    np.testing.assert_allclose(js[0, 0], 0.0)
    dist = domain_distributions(trace)
    np.testing.assert_allclose(dist["code"][1], [0, 0, 1, 0])
    np.testing.assert_allclose(dist["math"].sum(axis=1), 1.0)


def test_domain_metrics_need_labels():
    with pytest.raises(ValueError, match="domain labels"):
        domain_divergence(random_trace(0))


# ----------------------------------------------------------------------------- affinity


def test_affinity_of_a_fixed_permutation_is_a_permutation_matrix():
    E = 5
    first = np.arange(20)[:, None] % E
    seq = np.stack([first, (first + 1) % E, (first + 3) % E])  # (L=3, T=20, K=1)
    A = affinity(RoutingTrace([seq], E))
    np.testing.assert_allclose(A[0], np.roll(np.eye(E), 1, axis=1))
    np.testing.assert_allclose(A[1], np.roll(np.eye(E), 2, axis=1))


def test_affinity_matches_token_loop():
    trace = random_trace(7, L=3, E=4, K=2, S=4)
    L, E = trace.num_layers, trace.num_experts
    co = np.zeros((L - 1, E, E))
    used = np.zeros((L - 1, E))
    for s in trace.seqs:
        for j in range(L - 1):
            for t in range(s.shape[1]):
                for i in s[j, t][s[j, t] >= 0]:
                    used[j, i] += 1
                    for p in s[j + 1, t][s[j + 1, t] >= 0]:
                        co[j, i, p] += 1
    expected = np.divide(co, used[:, :, None], out=np.zeros_like(co), where=used[:, :, None] > 0)
    np.testing.assert_allclose(affinity(trace), expected)


# ----------------------------------------------------------------------------- validation


def test_trace_validation():
    with pytest.raises(ValueError, match="same expert twice"):
        RoutingTrace([np.array([[[1, 1]]])], 4)
    with pytest.raises(ValueError, match="0..3"):
        RoutingTrace([np.array([[[4]]])], 4)
    with pytest.raises(ValueError, match="shape"):
        RoutingTrace([np.zeros((2, 3, 1), dtype=int), np.zeros((1, 3, 1), dtype=int)], 4)
    with pytest.raises(ValueError, match="labels"):
        RoutingTrace([np.zeros((1, 3, 1), dtype=int)], 4, domains=["a", "b"])


# ----------------------------------------------------------------------------- prefetch recall


def brute_affinity_recall(trace: RoutingTrace, d: int) -> np.ndarray:
    """The affinity predictor token by token: 2 folds by sequence parity, ties to the lower id."""
    L, E, S = trace.num_layers, trace.num_experts, len(trace.seqs)
    hits, reqs = np.zeros(L), np.zeros(L)
    for fit, score in [(range(1, S, 2), range(0, S, 2)), (range(0, S, 2), range(1, S, 2))]:
        A = affinity(trace.subset(list(fit)), distance=d)
        for s in (trace.seqs[i] for i in score):
            for j in range(L - d):
                for t in range(s.shape[1]):
                    src = sorted(int(e) for e in s[j, t] if e >= 0)
                    dst = {int(e) for e in s[j + d, t] if e >= 0}
                    score_E = np.zeros(E)
                    for i in src:
                        score_E += A[j, i]
                    top = sorted(range(E), key=lambda e: (-score_E[e], e))[:len(dst)]
                    hits[j + d] += len(dst & set(top))
                    reqs[j + d] += len(dst)
    out = np.where(reqs > 0, hits / np.maximum(reqs, 1), np.nan)
    out[:d] = np.nan
    return out


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_affinity_prefetch_recall_matches_token_loop(seed):
    trace = random_trace(seed, L=4, E=6, K=3, S=5, T_max=15)
    recall = affinity_prefetch_recall(trace, 3)
    for d in (1, 2, 3):
        np.testing.assert_allclose(recall[d], brute_affinity_recall(trace, d), equal_nan=True)
