"""Do harder tokens get more experts? Token difficulty against experts used.

The claim under test (arXiv 2403.07652, "Harder Tasks Need More Experts: Dynamic Routing in MoE
Models") is that a dynamic router spends more experts on harder inputs. Here a token's difficulty
is its next-token loss under the routed model itself (`RoutingTrace.token_loss`, recorded by
`record_trace(..., token_loss=True)`; `moekit analyze` records it for runs and transformers
checkpoints), and the statistic is Spearman's rank correlation between that loss and the number of
experts the token executed: per layer, per domain (experts summed over layers), per (domain, layer)
and overall. Spearman, because neither quantity is expected to be linear in the other; ties get
average ranks (a top-p router gives many tokens the same k). A router with fixed k gives a constant
count, for which the correlation is undefined: reported as null, never as 0.

The loss of token t is -log p(token t+1 | tokens <= t): the prediction the routing of token t
served. The last token of a sequence has no next token and is left out.

Legend (analysis letters): L layers, T tokens, G domains, X tokens pooled over sequences.
"""

from __future__ import annotations

import math

import numpy as np

from moekit.analysis.routing_trace import RoutingTrace

__all__ = ["difficulty_vs_experts", "spearman"]

MIN_TOKENS = 3  # fewer pairs than this carry no rank information


def _average_ranks(x_X: np.ndarray) -> np.ndarray:
    """Ranks 1..X, tied values sharing the mean of their ranks."""
    order = np.argsort(x_X, kind="mergesort")
    ranks_X = np.empty(x_X.size, dtype=np.float64)
    ranks_X[order] = np.arange(1, x_X.size + 1)
    _, group_X, tie_sizes = np.unique(x_X, return_inverse=True, return_counts=True)
    return (np.bincount(group_X, weights=ranks_X) / tie_sizes)[group_X]


def spearman(a_X, b_X) -> float:
    """Spearman's rank correlation of two equal-length samples (average ranks for ties); NaN when
    fewer than 3 pairs or either sample is constant (the correlation is undefined there).
    Numpy only: the one rank statistic moekit needs does not justify a SciPy dependency; it equals
    scipy.stats.spearmanr on the same data."""
    a_X, b_X = np.asarray(a_X, dtype=np.float64), np.asarray(b_X, dtype=np.float64)
    if a_X.shape != b_X.shape or a_X.ndim != 1:
        raise ValueError(f"spearman: expected two 1-D samples of one length, got shapes {a_X.shape} and {b_X.shape}")
    if a_X.size < MIN_TOKENS:
        return math.nan
    ra, rb = _average_ranks(a_X), _average_ranks(b_X)
    ra -= ra.mean()
    rb -= rb.mean()
    denom = math.sqrt(float(ra @ ra) * float(rb @ rb))
    return math.nan if denom == 0.0 else float(ra @ rb) / denom


def _quantile_means(loss_X: np.ndarray, k_X: np.ndarray, bins: int) -> dict:
    """Mean experts per token in each loss quantile bin (equal-count bins, easiest first)."""
    if loss_X.size < bins:
        return {"loss_mean": [], "experts_mean": []}
    order = np.argsort(loss_X, kind="mergesort")
    parts = np.array_split(order, bins)
    return {"loss_mean": [float(loss_X[p].mean()) for p in parts],
            "experts_mean": [float(k_X[p].mean()) for p in parts]}


def difficulty_vs_experts(trace: RoutingTrace, bins: int = 5) -> dict:
    """Spearman correlation between each token's next-token loss and the experts it executed.

    Returns a JSON-ready dict: `overall` (loss against experts summed over layers, all tokens),
    `per_layer` (list of L), `per_domain` {domain: {"overall", "per_layer"}} when the trace has domain
    labels, `n_tokens`, and `by_loss_quantile` (mean loss and mean experts per token in `bins`
    equal-count loss bins, easiest first) for a plot. Correlations are floats or None (undefined:
    fewer than 3 tokens or a constant count). Raises ValueError when the trace has no token losses.
    """
    if trace.token_loss is None:
        raise ValueError("difficulty_vs_experts: the trace has no token losses; record it with "
                         "record_trace(..., token_loss=True) (moekit analyze does this for runs and --hf)")
    L = trace.num_layers
    loss, k_LX, domain = [], [], []
    for i, (experts_LTK, loss_T) in enumerate(zip(trace.seqs, trace.token_loss, strict=True)):
        keep_T = np.isfinite(loss_T)
        loss.append(loss_T[keep_T])
        k_LX.append((experts_LTK >= 0).sum(axis=2)[:, keep_T])
        domain.append(np.full(int(keep_T.sum()), i))
    loss_X = np.concatenate(loss).astype(np.float64)
    k_LX = np.concatenate(k_LX, axis=1)
    seq_X = np.concatenate(domain)

    def clean(r: float) -> float | None:
        return None if math.isnan(r) else r

    def block(mask_X: np.ndarray) -> dict:
        return {"overall": clean(spearman(loss_X[mask_X], k_LX[:, mask_X].sum(axis=0))),
                "per_layer": [clean(spearman(loss_X[mask_X], k_LX[layer, mask_X])) for layer in range(L)],
                "n_tokens": int(mask_X.sum())}

    out = block(np.ones(loss_X.size, dtype=bool))
    out["by_loss_quantile"] = _quantile_means(loss_X, k_LX.sum(axis=0) / L, bins)
    out["per_domain"] = None
    if trace.domains is not None:
        labels = np.asarray(trace.domains)[seq_X] if seq_X.size else np.asarray([], dtype=str)
        out["per_domain"] = {d: block(labels == d) for d in sorted(set(trace.domains))}
    out["definition"] = ("Spearman rank correlation between a token's next-token loss (nats, under the routed "
                         "model) and the number of experts it executed (summed over layers for 'overall'); "
                         "null where undefined (fewer than 3 tokens, or a fixed-k router's constant count)")
    return out
