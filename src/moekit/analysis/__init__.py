"""Routing analysis: trace metrics (load, locality, affinity, skew) and expert-cache simulation.

Pure numpy; no model code. See docs/analysis-metrics.md for every definition.
"""

from moekit.analysis.cache import (
    CacheResult,
    bypass_min,
    layer_requests,
    model_requests,
    set_min,
    simulate_lfu,
    simulate_lru,
    simulate_sch,
    simulate_static,
    simulate_trace,
)
from moekit.analysis.metrics import (
    LoadStats,
    RoutingTrace,
    affinity,
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

__all__ = [
    "CacheResult", "LoadStats", "RoutingTrace", "affinity", "bypass_min", "coefficient_of_variation",
    "domain_distributions", "domain_divergence", "entropy", "expert_counts", "experts_per_token",
    "experts_per_token_by_domain", "gini", "js_divergence", "layer_requests", "load_stats",
    "model_requests", "set_min", "simulate_lfu", "simulate_lru", "simulate_sch", "simulate_static",
    "simulate_trace", "srp", "srp_bootstrap", "srp_random_baseline", "static_hot_set",
]
