"""Routing analysis: record traces, compute metrics (load, locality, affinity, skew), simulate
expert caches against their optimal bounds, and write an HTML report.

Metrics and simulators are pure numpy; only the recorder (trace.py) touches torch models.
See docs/analysis-metrics.md (definitions), docs/trace-format.md (file) and docs/analyze.md (report).

Shape letters: the core's (L layers, T tokens, E experts, K expert slots per token or step, N
assignments, i.e. valid requests in order), and analysis' own: S sequences, G domains, R bootstrap
replicates, C cache capacity (and stack depth), Q steps of a request stream (a token at one layer,
or at every layer; a trace row), U SRP scoring units, V window counts 0..n, J layer pairs (l, l + d),
P cache policies, Z (policy, stream) rows of the stack simulation. moekit.offload's simulation uses
the same letters.
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
    simulate_sch_keep,
    simulate_static,
    simulate_trace,
)
from moekit.analysis.metrics import (
    LoadStats,
    affinity,
    affinity_prefetch_recall,
    coefficient_of_variation,
    domain_distributions,
    domain_divergence,
    entropy,
    expert_counts,
    experts_per_token,
    experts_per_token_by_domain,
    gate_prefetch_precision,
    gate_prefetch_recall,
    gini,
    js_divergence,
    load_stats,
    srp,
    srp_bootstrap,
    srp_random_baseline,
    static_hot_set,
)
from moekit.analysis.report import AnalysisConfig, analyze, compute_metrics
from moekit.analysis.routing_trace import RoutingTrace
from moekit.analysis.stack import StackCurves, stack_hit_curves
from moekit.analysis.trace import TokenBatch, TraceRecorder, corpus_batches, record_trace
from moekit.analysis.tracefile import TraceFormatError, load_trace, read_header, save_trace

__all__ = [
    "AnalysisConfig", "CacheResult", "LoadStats", "RoutingTrace", "StackCurves", "TokenBatch", "TraceFormatError",
    "TraceRecorder", "affinity", "affinity_prefetch_recall", "analyze", "bypass_min", "coefficient_of_variation",
    "compute_metrics", "corpus_batches", "domain_distributions", "domain_divergence", "entropy", "expert_counts",
    "experts_per_token", "experts_per_token_by_domain", "gate_prefetch_precision", "gate_prefetch_recall", "gini",
    "js_divergence",
    "layer_requests", "load_stats", "load_trace", "model_requests", "read_header", "record_trace", "save_trace",
    "set_min", "simulate_lfu", "simulate_lru", "simulate_sch", "simulate_sch_keep", "simulate_static", "simulate_trace",
    "srp",
    "srp_bootstrap", "srp_random_baseline", "stack_hit_curves", "static_hot_set",
]
