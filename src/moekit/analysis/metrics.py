"""Routing-trace metrics in pure numpy: load balance, experts per token, domain
divergence, segment routing locality (SRP), cross-layer affinity and skew.

Definitions, with the paper each comes from: docs/analysis-metrics.md. The trace itself:
moekit.analysis.routing_trace.

Legend (the analysis letters of moekit.analysis):
  L  MoE layers             T  tokens of one sequence
  K  expert slots per token (K_max of the padded view; -1 marks an empty slot)
  E  experts per layer      C  cache capacity in experts
  S  sequences              G  domains
  R  bootstrap replicates   U  scoring units (1, or E for unit="expert")
  V  window counts 0..n     J  layer pairs (l, l + d)
  W  distinct expert sets of a source layer (affinity prediction)
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from moekit.analysis.routing_trace import RoutingTrace  # also importable from here, where it used to live

__all__ = [
    "LoadStats", "RoutingTrace", "affinity", "affinity_prefetch_recall", "coefficient_of_variation", "domain_distributions",
    "domain_divergence", "entropy", "expert_counts", "experts_per_token", "experts_per_token_by_domain",
    "gate_prefetch_precision", "gate_prefetch_recall",
    "gini", "intra_layer_reuse", "js_divergence", "load_stats", "srp", "srp_bootstrap", "srp_random_baseline",
    "static_hot_set",
]

_UNITS = ("layer", "model", "expert")


def _onehot_ET(experts_TK: np.ndarray, E: int) -> np.ndarray:
    """(E, T) int32 matrix: 1 where token t uses expert e. Expert-major so that cumulative
    sums over tokens run along contiguous memory (about 2x faster than (T, E))."""
    valid = experts_TK >= 0
    X_ET = np.zeros((E, experts_TK.shape[0]), dtype=np.int32)
    X_ET[experts_TK[valid], np.nonzero(valid)[0]] = 1
    return X_ET


# ----------------------------------------------------------------------------- scalar helpers


def coefficient_of_variation(x_E: np.ndarray) -> float:
    """Population std / mean (0 for perfectly balanced loads; nan when the mean is 0)."""
    x = np.asarray(x_E, dtype=np.float64)
    m = x.mean()
    return float(x.std() / m) if m > 0 else float("nan")


def gini(x_E: np.ndarray) -> float:
    """Gini coefficient sum_ij |x_i - x_j| / (2 E^2 mean): 0 balanced, (E-1)/E all on one expert."""
    x = np.sort(np.asarray(x_E, dtype=np.float64))
    n, total = x.size, x.sum()
    if total <= 0:
        return float("nan")
    # Sorted closed form of the mean absolute difference.
    rank = np.arange(1, n + 1)
    return float(2.0 * np.sum(rank * x) / (n * total) - (n + 1) / n)


def entropy(p_E: np.ndarray) -> float:
    """Shannon entropy in nats of a distribution (normalised here if it does not sum to 1)."""
    p = np.asarray(p_E, dtype=np.float64)
    p = p / p.sum()
    nz = p[p > 0]
    return float(-np.sum(nz * np.log(nz)))


def js_divergence(p_E: np.ndarray, q_E: np.ndarray) -> float:
    """Jensen-Shannon divergence in nats, 0.5 KL(p||m) + 0.5 KL(q||m), m = (p+q)/2; in [0, ln 2]."""
    p = np.asarray(p_E, dtype=np.float64)
    q = np.asarray(q_E, dtype=np.float64)
    p, q = p / p.sum(), q / q.sum()
    m = 0.5 * (p + q)

    def kl(a: np.ndarray) -> float:
        nz = a > 0
        return float(np.sum(a[nz] * np.log(a[nz] / m[nz])))

    return 0.5 * kl(p) + 0.5 * kl(q)


# ----------------------------------------------------------------------------- load


def expert_counts(trace: RoutingTrace) -> np.ndarray:
    """counts_LE: tokens routed to each expert of each layer, over all sequences."""
    L, E = trace.num_layers, trace.num_experts
    counts_LE = np.zeros((L, E), dtype=np.int64)
    for s in trace.seqs:
        layer_idx = np.broadcast_to(np.arange(L)[:, None, None], s.shape)
        valid = s >= 0
        counts_LE += np.bincount(layer_idx[valid] * E + s[valid], minlength=L * E).reshape(L, E)
    return counts_LE


@dataclass
class LoadStats:
    """Per-layer load-balance statistics (all arrays have shape (L,) except counts_LE)."""

    counts_LE: np.ndarray
    cv_L: np.ndarray               # coefficient of variation of the counts
    max_over_mean_L: np.ndarray    # max count / mean count
    entropy_L: np.ndarray          # entropy of counts/sum, nats
    norm_entropy_L: np.ndarray     # entropy / ln E, 1 when balanced
    gini_L: np.ndarray             # Gini coefficient of the counts


def load_stats(trace: RoutingTrace) -> LoadStats:
    """Load statistics of every layer."""
    counts_LE = expert_counts(trace)
    E = trace.num_experts
    cv = np.array([coefficient_of_variation(c) for c in counts_LE])
    mean = counts_LE.mean(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mx = np.where(mean > 0, counts_LE.max(axis=1) / mean, np.nan)
    ent = np.array([entropy(c) if c.sum() > 0 else np.nan for c in counts_LE])
    # NOTE: with a single expert the load is trivially balanced, so normalised entropy is 1.
    norm = ent / np.log(E) if E > 1 else np.ones_like(ent)
    g = np.array([gini(c) for c in counts_LE])
    return LoadStats(counts_LE, cv, mx, ent, norm, g)


def intra_layer_reuse(trace: RoutingTrace) -> np.ndarray | None:
    """reuse_L: per layer, the share of the picks of Chain-of-Experts iterations t >= 1 (arXiv
    2506.18945) whose expert an earlier iteration of the same layer already ran for that token
    (0: every iteration picks new experts; 1: the chain re-applies the same ones). nan where a layer
    made no later-iteration picks; None for a trace without an iteration axis."""
    if trace.iterations is None:
        return None
    # int64: an unsigned count minus 1 would wrap at padded slots (mask 0)
    popcount = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).sum(axis=1).astype(np.int64)
    repeats_L = np.zeros(trace.num_layers)
    later_L = np.zeros(trace.num_layers)
    for m_LTK in trace.iterations:
        picks_LTK = popcount[m_LTK]
        repeats_L += np.maximum(picks_LTK - 1, 0).sum(axis=(1, 2))  # picks of an expert already run
        later_L += popcount[m_LTK >> 1].sum(axis=(1, 2))  # picks of iterations t >= 1
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(later_L > 0, repeats_L / later_L, np.nan)


def static_hot_set(trace: RoutingTrace, C: int, unit: str = "layer") -> tuple[np.ndarray, np.ndarray]:
    """Best static hot set of C experts and the hit rate it bounds (sum of its top-C frequencies).

    unit="layer": one set per layer, returns (hot_LC, bound_L).
    unit="model": one set of C ids over all layers (id = layer*E + expert), returns (hot_C, bound).
    Ties between equally frequent experts go to the lower id.
    """
    counts_LE = expert_counts(trace)
    if unit == "layer":
        order_LE = np.argsort(-counts_LE, axis=1, kind="stable")
        hot_LC = order_LE[:, :C]
        top = np.take_along_axis(counts_LE, hot_LC, axis=1).sum(axis=1)
        return hot_LC, top / np.maximum(counts_LE.sum(axis=1), 1)
    if unit == "model":
        flat = counts_LE.ravel()
        hot_C = np.argsort(-flat, kind="stable")[:C]
        return hot_C, np.asarray(flat[hot_C].sum() / max(flat.sum(), 1))
    raise ValueError(f"unit must be 'layer' or 'model', got {unit!r}")


# ----------------------------------------------------------------------------- experts per token


def _k_hist(trace: RoutingTrace, seq_idx: Sequence[int]) -> np.ndarray:
    """hist_LK1: tokens using exactly k experts, k = 0..K_max over the given sequences."""
    K = max(s.shape[2] for s in trace.seqs)
    L = trace.num_layers
    hist = np.zeros((L, K + 1), dtype=np.int64)
    for i in seq_idx:
        k_LT = (trace.seqs[i] >= 0).sum(axis=2)
        for layer in range(L):
            hist[layer] += np.bincount(k_LT[layer], minlength=K + 1)
    return hist


def _mean_from_hist(hist_LK1: np.ndarray) -> np.ndarray:
    n = hist_LK1.sum(axis=1)
    k = np.arange(hist_LK1.shape[1])
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, (hist_LK1 * k).sum(axis=1) / n, np.nan)


def experts_per_token(trace: RoutingTrace) -> tuple[np.ndarray, np.ndarray]:
    """(mean_L, hist_LK1): mean experts per token and the count of tokens using k = 0..K_max experts."""
    hist = _k_hist(trace, range(len(trace.seqs)))
    return _mean_from_hist(hist), hist


def _domain_index(trace: RoutingTrace) -> dict[str, list[int]]:
    if trace.domains is None:
        raise ValueError("this metric needs domain labels: build the RoutingTrace with domains=[...]")
    out: dict[str, list[int]] = {}
    for i, d in enumerate(trace.domains):
        out.setdefault(d, []).append(i)
    return out


def experts_per_token_by_domain(trace: RoutingTrace) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{domain: (mean_L, hist_LK1)} as in `experts_per_token`, one entry per domain label."""
    out = {}
    for d, idx in _domain_index(trace).items():
        hist = _k_hist(trace, idx)
        out[d] = (_mean_from_hist(hist), hist)
    return out


# ----------------------------------------------------------------------------- domains


def domain_distributions(trace: RoutingTrace) -> dict[str, np.ndarray]:
    """{domain: p_LE}: per layer, the fraction of that domain's expert assignments going to each expert."""
    out = {}
    for d, idx in _domain_index(trace).items():
        c = expert_counts(trace.subset(idx)).astype(np.float64)
        out[d] = c / np.maximum(c.sum(axis=1, keepdims=True), 1)
    return out


def domain_divergence(trace: RoutingTrace) -> tuple[list[str], np.ndarray]:
    """(domains, js_GGL): Jensen-Shannon divergence (nats) between the per-layer expert
    distributions of every pair of domains; symmetric, 0 on the diagonal, ln 2 for disjoint experts."""
    dist = domain_distributions(trace)
    names = sorted(dist)
    G, L = len(names), trace.num_layers
    js = np.zeros((G, G, L))
    for a in range(G):
        for b in range(a + 1, G):
            for layer in range(L):
                js[a, b, layer] = js[b, a, layer] = js_divergence(dist[names[a]][layer], dist[names[b]][layer])
    return names, js


# ----------------------------------------------------------------------------- SRP


def srp_random_baseline(k: float, E: int) -> float:
    """SRP of routing that ignores the segment: 2k/(E+k) (arXiv 2505.16056)."""
    return 2.0 * k / (E + k)


def _window_hist(experts_TK: np.ndarray, E: int, n: int) -> np.ndarray:
    """hist_E(n+1)[e, v]: number of length-n windows (stride 1) in which expert e is used by
    exactly v tokens. A sequence shorter than n has no window and contributes nothing."""
    T = experts_TK.shape[0]
    if T < n:
        return np.zeros((E, n + 1), dtype=np.int64)
    cs_ET = np.zeros((E, T + 1), dtype=np.int32)
    np.cumsum(_onehot_ET(experts_TK, E), axis=1, out=cs_ET[:, 1:])
    c_EW = cs_ET[:, n:] - cs_ET[:, :-n]  # c[s, e] of docs/analysis-metrics.md (SRP), one column per window s
    # Offset by expert so one bincount yields every expert's histogram.
    c_EW += (np.arange(E, dtype=np.int32) * (n + 1))[:, None]
    return np.bincount(c_EW.ravel(), minlength=E * (n + 1)).reshape(E, n + 1)


def _srp_from_hist(hist_xV: np.ndarray, n: int) -> np.ndarray:
    """max over tau of F1(tau) from window-count histograms over the last axis (v = 0..n).

    For threshold tau the group is {e : c >= tau}: matches = sum_{v>=tau} v h[v],
    preds = n * sum_{v>=tau} h[v], acts = sum_v v h[v]  (arXiv 2505.16056, SRP).
    """
    h = hist_xV.astype(np.float64)
    v = np.arange(n + 1)
    # Reverse cumulative sums give the tau >= v tails for every tau at once.
    ge = np.flip(np.cumsum(np.flip(h, -1), -1), -1)
    matches = np.flip(np.cumsum(np.flip(h * v, -1), -1), -1)
    acts = matches[..., :1]  # tau = 0 keeps every expert, so matches(0) = acts
    # NOTE: a unit with no use at all (acts = 0: no window, or an expert never used) has no
    # positives, so F1 is undefined: nan. Otherwise every denominator is > 0.
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = 2.0 * matches / (n * ge + acts)
    return np.where(acts[..., 0] > 0, np.max(np.where(acts > 0, f1, 0.0), axis=-1), np.nan)


def _check_unit(unit: str, n: int) -> None:
    if unit not in _UNITS:
        raise ValueError(f"unit must be one of {_UNITS}, got {unit!r}")
    if n < 1:
        raise ValueError(f"segment length n must be >= 1, got {n}")


def _per_sequence_hists(trace: RoutingTrace, n: int, layer: int, unit: str) -> np.ndarray:
    """hist_SUV for one layer: U = E for unit='expert', else 1 (summed over experts)."""
    E = trace.num_experts
    h = np.stack([_window_hist(s[layer], E, n) for s in trace.seqs])
    return h if unit == "expert" else h.sum(axis=1, keepdims=True)


def srp(trace: RoutingTrace, n: int, unit: str = "layer") -> np.ndarray | float:
    """SRP(n), segment routing best performance (arXiv 2505.16056).

    Windows of n tokens slide with stride 1 over every sequence and layer; for each unit,
    matches/preds/acts are summed over all its windows for each tau in 0..n, then the best
    F1 is taken (one tau per unit). Units: 'layer' -> (L,), 'model' -> float (counts summed
    over all layers, one tau), 'expert' -> (L, E) (one tau per expert of each layer).
    nan where a unit is never used in any window (no positives; e.g. every sequence is
    shorter than n, or an expert no token uses).
    """
    _check_unit(unit, n)
    E = trace.num_experts
    hist_LEV = np.stack([sum(_window_hist(s[layer], E, n) for s in trace.seqs)
                         for layer in range(trace.num_layers)])
    hist_LUV = hist_LEV if unit == "expert" else hist_LEV.sum(axis=1, keepdims=True)
    if unit == "model":
        return float(_srp_from_hist(hist_LUV.sum(axis=(0, 1)), n))
    out = _srp_from_hist(hist_LUV, n)
    return out[:, 0] if unit == "layer" else out


def srp_bootstrap(trace: RoutingTrace, n: int, unit: str = "layer", n_boot: int = 200,
                  seed: int = 0) -> tuple[np.ndarray | float, np.ndarray | float, np.ndarray | float]:
    """(value, lo, hi): SRP(n) and its 95% percentile bootstrap interval over sequences.

    Each replicate resamples the sequences with replacement and recomputes SRP from the
    resampled counts (sum counts first, then max over tau), shapes as in `srp`. Memory grows
    with S * U * (n+1) per layer plus R * L * U * (n+1): unit='expert' with large n is the
    costly case.
    """
    _check_unit(unit, n)
    S = len(trace.seqs)
    rng = np.random.default_rng(seed)
    # Multiplicity of each sequence in each replicate: resampling = weighted sum of per-sequence counts.
    w_RS = rng.multinomial(S, np.full(S, 1.0 / S), size=n_boot).astype(np.float64)
    value, boot = [], []
    for layer in range(trace.num_layers):
        h_SUV = _per_sequence_hists(trace, n, layer, unit).astype(np.float64)
        value.append(h_SUV.sum(axis=0))
        boot.append((w_RS @ h_SUV.reshape(S, -1)).reshape(n_boot, *h_SUV.shape[1:]))
    value_LUV, boot_RLUV = np.stack(value), np.stack(boot, axis=1)
    if unit == "model":
        point = float(_srp_from_hist(value_LUV.sum(axis=(0, 1)), n))
        lo, hi = _interval(_srp_from_hist(boot_RLUV.sum(axis=(1, 2)), n))
        return point, float(lo), float(hi)
    point = _srp_from_hist(value_LUV, n)
    lo, hi = _interval(_srp_from_hist(boot_RLUV, n))
    if unit == "layer":
        return point[:, 0], lo[:, 0], hi[:, 0]
    return point, lo, hi


def _interval(reps_R: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """2.5 and 97.5 percentiles over the replicate axis, nan where every replicate is nan."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-nan units are expected (unused experts)
        lo, hi = np.nanpercentile(reps_R, [2.5, 97.5], axis=0)
    return lo, hi


# ----------------------------------------------------------------------------- cross-layer affinity


def _cooccurrence(trace: RoutingTrace, distance: int, seq_idx: Sequence[int] | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(co_JEE, used_JE) for layer pairs (j, j + distance): tokens using i at j and p at j+d,
    and tokens using i at j."""
    L, E = trace.num_layers, trace.num_experts
    J = max(L - distance, 0)
    co = np.zeros((J, E * E), dtype=np.int64)
    used = np.zeros((J, E), dtype=np.int64)
    for si in range(len(trace.seqs)) if seq_idx is None else seq_idx:
        s = trace.seqs[si]
        for j in range(J):
            a_TK, b_TK = s[j], s[j + distance]
            # All (i, p) pairs of one token: K_j x K_{j+d} per token, never T x E.
            pair = a_TK[:, :, None] * E + b_TK[:, None, :]
            ok = (a_TK[:, :, None] >= 0) & (b_TK[:, None, :] >= 0)
            co[j] += np.bincount(pair[ok], minlength=E * E)
            used[j] += np.bincount(a_TK[a_TK >= 0], minlength=E)
    return co.reshape(J, E, E), used


def affinity(trace: RoutingTrace, distance: int = 1) -> np.ndarray:
    """A_JEE with J = L - distance: A[j, i, p] = P(expert p used at layer j+distance | expert i used
    at layer j) (arXiv 2401.08383 for distance 1).

    Counted over tokens: co-occurrences of (i at j, p at j+d) divided by the tokens using i at
    layer j. With k experts per token a row sums to the mean k of layer j+d (1 for top-1);
    rows of experts never used at layer j are 0.
    """
    if distance < 1:
        raise ValueError(f"affinity distance must be >= 1, got {distance}")
    co_JEE, used_JE = _cooccurrence(trace, distance)
    co_JEE = co_JEE.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(used_JE[:, :, None] > 0, co_JEE / np.maximum(used_JE[:, :, None], 1), 0.0)


# ----------------------------------------------------------------------------- prefetch recall


def _affinity_hits(A_EE: np.ndarray, src_TK: np.ndarray, dst_TK: np.ndarray) -> tuple[int, int]:
    """(hits, requests) of the affinity predictor from layer-j experts src_TK to layer-(j+d) experts
    dst_TK: score(p) = sum over the token's experts i of A[i, p]; the top-k_t scores are prefetched
    (k_t = experts really used, ties to the lower id)."""
    E = A_EE.shape[0]
    ok_TK = dst_TK >= 0
    k_T = ok_TK.sum(axis=1)
    # The prediction depends only on the token's set of source experts: rank once per distinct set.
    src_sorted = np.sort(src_TK, axis=1)
    K = src_sorted.shape[1]
    if K * np.log2(E + 1) < 62:  # one int64 key per set: digits id+1 in base E+1 (a 1-d unique is fast)
        key_T = ((src_sorted + 1) * (E + 1) ** np.arange(K, dtype=np.int64)).sum(axis=1)
        _, first_W, inv_T = np.unique(key_T, return_index=True, return_inverse=True)
        uniq_WK = src_sorted[first_W]
    else:
        uniq_WK, inv_T = np.unique(src_sorted, axis=0, return_inverse=True)
    inv_T = inv_T.reshape(-1)
    scores_WE = np.where((uniq_WK >= 0)[:, :, None], A_EE[np.maximum(uniq_WK, 0)], 0.0).sum(axis=1)
    order_WE = np.argsort(-scores_WE, axis=1, kind="stable")  # stable: equal scores keep id order
    rank_WE = np.empty_like(order_WE)
    np.put_along_axis(rank_WE, order_WE, np.arange(E)[None, :].repeat(len(uniq_WK), 0), axis=1)
    rank_TK = rank_WE[inv_T[:, None], np.maximum(dst_TK, 0)]
    return int((ok_TK & (rank_TK < k_T[:, None])).sum()), int(k_T.sum())


def affinity_prefetch_recall(trace: RoutingTrace, max_distance: int = 3) -> dict[int, np.ndarray]:
    """{d: recall_L}: prefetch recall of a predictor that knows only the experts of layer j and the
    empirical affinity A_d (see `affinity`): it scores expert p of layer j+d by sum over the token's
    experts i at layer j of P(p at j+d | i at j) and prefetches the top-k_t, k_t = experts the token
    really uses at j+d (so recall = precision). recall_L[l] = hits / requests at target layer l
    (nan for l < d).

    NOTE: this is the trace-only substitute for gate-based prefetch (which needs hidden states, see
    `gate_prefetch_recall`). A is fitted out of fold: sequences are split by index parity, each half
    is scored with the affinity of the other half (in-sample when there is a single sequence).
    Random guessing scores k/E.
    """
    L, S = trace.num_layers, len(trace.seqs)
    folds = [(list(range(1, S, 2)), list(range(0, S, 2))), (list(range(0, S, 2)), list(range(1, S, 2)))]
    if S == 1:
        folds = [([0], [0])]
    out = {}
    for d in range(1, max_distance + 1):
        hits = np.zeros(L)
        reqs = np.zeros(L)
        for fit, score in folds:
            co_JEE, used_JE = _cooccurrence(trace, d, fit)
            A_JEE = co_JEE / np.maximum(used_JE[:, :, None], 1)
            sub_LTK = trace.subset(score).stacked()
            for j in range(L - d):
                h, r = _affinity_hits(A_JEE[j], sub_LTK[j], sub_LTK[j + d])
                hits[j + d] += h
                reqs[j + d] += r
        with np.errstate(invalid="ignore", divide="ignore"):
            out[d] = np.where(reqs > 0, hits / np.maximum(reqs, 1), np.nan)
            out[d][:d] = np.nan
    return out


def _gate_prefetch_counts(trace: RoutingTrace) -> dict[int, tuple[np.ndarray, ...]]:
    """{d: (hits_L, requests_L, predicted_L, has_L)} of the recorded router-based predictions."""
    L = trace.num_layers
    out = {}
    for d, preds in sorted((trace.prefetch or {}).items()):
        hits, reqs, npred = np.zeros(L), np.zeros(L), np.zeros(L)
        has = np.zeros(L, dtype=bool)
        for s, p in zip(trace.seqs, preds, strict=True):
            ok_LTK = s >= 0
            has |= (p >= 0).any(axis=(1, 2))
            # executed_LTK vs predicted_LTK: is each executed expert among the token's predictions?
            found_LTK = ((s[:, :, :, None] == p[:, :, None, :]) & ok_LTK[..., None]).any(axis=3)
            hits += found_LTK.sum(axis=(1, 2))
            reqs += ok_LTK.sum(axis=(1, 2))
            npred += (p >= 0).sum(axis=(1, 2))
        has[:d] = False
        out[d] = (hits, reqs, npred, has)
    return out


def gate_prefetch_recall(trace: RoutingTrace) -> dict[int, np.ndarray]:
    """{d: recall_L} of the router-based predictions recorded in `trace.prefetch` (layer l's router
    applied to layer (l-d)'s input, moekit.routers.predict; the gate look-ahead of mixtral-offloading,
    Fate, AdapMoE): the share of the experts layer l executes that the prediction contains. nan for
    l < d and for layers without predictions. Empty when the trace has no predictions."""
    out = {}
    for d, (hits, reqs, _, has) in _gate_prefetch_counts(trace).items():
        with np.errstate(invalid="ignore", divide="ignore"):
            out[d] = np.where(has & (reqs > 0), hits / np.maximum(reqs, 1), np.nan)
    return out


def gate_prefetch_precision(trace: RoutingTrace) -> dict[int, np.ndarray]:
    """{d: precision_L}: the share of predicted experts (as in `gate_prefetch_recall`) that layer l
    executes, i.e. the prefetches that would be useful. nan where there are no predictions."""
    out = {}
    for d, (hits, _, npred, has) in _gate_prefetch_counts(trace).items():
        with np.errstate(invalid="ignore", divide="ignore"):
            out[d] = np.where(has & (npred > 0), hits / np.maximum(npred, 1), np.nan)
    return out
