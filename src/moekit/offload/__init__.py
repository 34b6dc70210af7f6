"""Memory-constrained inference: an expert store on disk, a byte-budgeted expert cache (LRU, LFU,
static hot set, predictive prefetch), and generation that keeps only cached experts resident.

    from moekit.offload import offloaded_generate, write_store, offload, ExpertStore
    result = offloaded_generate("runs/tiny", prompt_ids, 64, budget="25%", policy="predictive")
    print(result.metrics["decode_tokens_per_s"], result.metrics["hit_rate"])

See docs/offload.md for the store format, the cache conventions and measured numbers.
"""

from moekit.offload.budget import POLICIES, SCOPES, CachePlan, parse_budget, plan_cache
from moekit.offload.cache import ExpertCache
from moekit.offload.generate import OffloadResult, decode_loop, offloaded_generate, run_metrics
from moekit.offload.load import load_dense_lm
from moekit.offload.prefetch import PrefetchError
from moekit.offload.runtime import OffloadedExperts, OffloadRuntime, offload
from moekit.offload.simulate import simulate_predictive, simulate_run
from moekit.offload.store import ExpertStore, ExpertStoreError, write_store

__all__ = [
    "POLICIES", "SCOPES", "CachePlan", "ExpertCache", "ExpertStore", "ExpertStoreError", "OffloadResult",
    "OffloadRuntime", "OffloadedExperts", "PrefetchError", "decode_loop", "load_dense_lm", "offload",
    "offloaded_generate", "parse_budget", "plan_cache", "run_metrics", "simulate_predictive", "simulate_run",
    "write_store",
]
