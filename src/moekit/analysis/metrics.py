"""Routing-trace metrics in pure numpy: load balance, experts per token, domain
divergence, segment routing locality (SRP), cross-layer affinity and skew.

Every definition follows /work/shared/design/offload.md; docs/analysis-metrics.md
restates them with the conventions chosen here.

Legend of shape suffixes:
  L  MoE layers             T  tokens of one sequence
  K  expert slots per token (K_max of the padded view; -1 marks an empty slot)
  E  experts per layer      C  cache capacity in experts
  S  sequences              D  domains
  B  bootstrap replicates   U  scoring units (1, or E for unit="expert")

A routing trace is a list of sequences, each an int array `experts_LTK` holding the
*executed* expert ids per layer and token, padded with -1 where a dynamic router
used fewer than K_max experts. Sequences may differ in T (and in K_max).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "LoadStats", "RoutingTrace", "affinity", "coefficient_of_variation", "domain_distributions",
    "domain_divergence", "entropy", "expert_counts", "experts_per_token", "experts_per_token_by_domain",
    "gini", "js_divergence", "load_stats", "srp", "srp_bootstrap", "srp_random_baseline",
    "static_hot_set",
]

_UNITS = ("layer", "model", "expert")


# ----------------------------------------------------------------------------- trace


@dataclass
class RoutingTrace:
    """Executed routing of several sequences.

    seqs: one int array `experts_LTK` (L, T, K_max) per sequence; -1 pads empty slots.
    num_experts: E, experts per layer (ids lie in 0..E-1).
    domains: optional domain label per sequence.
    """

    seqs: list[np.ndarray]
    num_experts: int
    domains: list[str] | None = None

    def __post_init__(self) -> None:
        if self.num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {self.num_experts}")
        if not self.seqs:
            raise ValueError("a RoutingTrace needs at least one sequence")
        seqs = [np.asarray(s) for s in self.seqs]
        L = seqs[0].shape[0] if seqs[0].ndim == 3 else -1
        for i, s in enumerate(seqs):
            if s.ndim != 3 or s.shape[0] != L:
                raise ValueError(f"sequence {i}: expected experts_LTK of shape ({L}, T, K_max), got {s.shape}")
            if not np.issubdtype(s.dtype, np.integer):
                raise ValueError(f"sequence {i}: expert ids must be integers, got dtype {s.dtype}")
            _check_ids(s, self.num_experts, f"sequence {i}")
        self.seqs = [s.astype(np.int64, copy=False) for s in seqs]
        if self.domains is not None:
            self.domains = [str(d) for d in self.domains]
            if len(self.domains) != len(self.seqs):
                raise ValueError(f"domains has {len(self.domains)} labels for {len(self.seqs)} sequences")

    @classmethod
    def from_layer(cls, seqs_TK: Sequence[np.ndarray], num_experts: int,
                   domains: Sequence[str] | None = None) -> RoutingTrace:
        """A one-layer trace from per-sequence `experts_TK` arrays."""
        return cls([np.asarray(s)[None] for s in seqs_TK], num_experts, None if domains is None else list(domains))

    @property
    def num_layers(self) -> int:
        return self.seqs[0].shape[0]

    @property
    def num_tokens(self) -> int:
        return sum(s.shape[1] for s in self.seqs)

    def subset(self, idx: Sequence[int]) -> RoutingTrace:
        """The trace restricted to the sequences `idx` (repeats allowed, e.g. for a bootstrap)."""
        doms = None if self.domains is None else [self.domains[i] for i in idx]
        return RoutingTrace([self.seqs[i] for i in idx], self.num_experts, doms)


def _check_ids(experts_xK: np.ndarray, E: int, what: str) -> None:
    """Ids must lie in -1..E-1 and a token may not list the same expert twice."""
    if experts_xK.size == 0:
        return
    lo, hi = int(experts_xK.min()), int(experts_xK.max())
    if lo < -1 or hi >= E:
        raise ValueError(f"{what}: expert ids must lie in 0..{E - 1} (or -1 for padding), found {lo}..{hi}")
    srt = np.sort(experts_xK, axis=-1)
    if np.any((srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] >= 0)):
        raise ValueError(f"{what}: a token lists the same expert twice")


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
    """(domains, js_DDL): Jensen-Shannon divergence (nats) between the per-layer expert
    distributions of every pair of domains; symmetric, 0 on the diagonal, ln 2 for disjoint experts."""
    dist = domain_distributions(trace)
    names = sorted(dist)
    D, L = len(names), trace.num_layers
    js = np.zeros((D, D, L))
    for a in range(D):
        for b in range(a + 1, D):
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
    c_EW = cs_ET[:, n:] - cs_ET[:, :-n]  # c[s, e] of offload.md, one column per window s
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
    with S * U * (n+1) per layer plus B * L * U * (n+1): unit='expert' with large n is the
    costly case.
    """
    _check_unit(unit, n)
    S = len(trace.seqs)
    rng = np.random.default_rng(seed)
    # Multiplicity of each sequence in each replicate: resampling = weighted sum of per-sequence counts.
    w_BS = rng.multinomial(S, np.full(S, 1.0 / S), size=n_boot).astype(np.float64)
    value, boot = [], []
    for layer in range(trace.num_layers):
        h_SUV = _per_sequence_hists(trace, n, layer, unit).astype(np.float64)
        value.append(h_SUV.sum(axis=0))
        boot.append((w_BS @ h_SUV.reshape(S, -1)).reshape(n_boot, *h_SUV.shape[1:]))
    value_LUV, boot_BLUV = np.stack(value), np.stack(boot, axis=1)
    if unit == "model":
        point = float(_srp_from_hist(value_LUV.sum(axis=(0, 1)), n))
        lo, hi = _interval(_srp_from_hist(boot_BLUV.sum(axis=(1, 2)), n))
        return point, float(lo), float(hi)
    point = _srp_from_hist(value_LUV, n)
    lo, hi = _interval(_srp_from_hist(boot_BLUV, n))
    if unit == "layer":
        return point[:, 0], lo[:, 0], hi[:, 0]
    return point, lo, hi


def _interval(reps_B: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """2.5 and 97.5 percentiles over the replicate axis, nan where every replicate is nan."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-nan units are expected (unused experts)
        lo, hi = np.nanpercentile(reps_B, [2.5, 97.5], axis=0)
    return lo, hi


# ----------------------------------------------------------------------------- cross-layer affinity


def affinity(trace: RoutingTrace) -> np.ndarray:
    """A_(L-1)EE: A[j, i, p] = P(expert p used at layer j+1 | expert i used at layer j) (arXiv 2401.08383).

    Counted over tokens: co-occurrences of (i at j, p at j+1) divided by the tokens using i at
    layer j. With k experts per token a row sums to the mean k of layer j+1 (1 for top-1);
    rows of experts never used at layer j are 0.
    """
    L, E = trace.num_layers, trace.num_experts
    co = np.zeros((max(L - 1, 0), E * E), dtype=np.int64)
    used = np.zeros((max(L - 1, 0), E), dtype=np.int64)
    for s in trace.seqs:
        for j in range(L - 1):
            a_TK, b_TK = s[j], s[j + 1]
            # All (i, p) pairs of one token: K_j x K_{j+1} per token, never T x E.
            pair = a_TK[:, :, None] * E + b_TK[:, None, :]
            ok = (a_TK[:, :, None] >= 0) & (b_TK[:, None, :] >= 0)
            co[j] += np.bincount(pair[ok], minlength=E * E)
            used[j] += np.bincount(a_TK[a_TK >= 0], minlength=E)
    co_JEE = co.reshape(-1, E, E).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(used[:, :, None] > 0, co_JEE / np.maximum(used[:, :, None], 1), 0.0)
