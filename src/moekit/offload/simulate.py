"""Re-simulate an offloaded run from its recorded routing trace: the same policy (which must agree
exactly with the measured cache) and the optimal bounds set-MIN and bypass-MIN.

Legend (the analysis letters, as moekit.analysis.cache): L MoE layers, E experts, B sequences per
forward, K experts per cache step (at most the plan's step size), Q steps, N requests, C capacity in
experts.

The request stream of a run follows from the trace alone (plus the cache plan): forward f of the
generation loop (f = 0 the prefill, f >= 1 one decode token each) recorded B sequences; at layer l
the forward needs the sorted union of the experts its tokens executed, cut into steps of at
most `step_size` experts (`OffloadRuntime.groups`). Per-layer caches see one stream per layer; the shared
cache sees steps in execution order (f, l, step) with ids l * E + e. Prefill requests warm the
cache but are reported apart; hit rates are over decode requests, cache cold when generation
starts (the analysis' "warm" convention does not apply).

lru, lfu and static run on moekit.analysis.cache's simulators; predictive (lru + prefetch) has
its own, `simulate_predictive`, fed with the predictions the run made.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moekit.analysis.cache import bypass_min, set_min, simulate_lfu, simulate_lru, simulate_static
from moekit.analysis.routing_trace import RoutingTrace
from moekit.offload.budget import CachePlan

__all__ = ["RunStream", "run_streams", "simulate_predictive", "simulate_run"]


@dataclass
class RunStream:
    """The requests one cache saw: steps (ids, -1 padded), the phase of each request, and the
    event order of steps and prefetches (predictive)."""

    requests_QK: np.ndarray
    decode_N: np.ndarray             # True for requests of decode forwards
    events: list[tuple]              # ("step", ids, layer) | ("prefetch", ids, layer)


def _pad(steps: list[list[int]], step_size: int) -> np.ndarray:
    out = np.full((len(steps), max(step_size, 1)), -1, dtype=np.int64)
    for i, s in enumerate(steps):
        out[i, :len(s)] = s
    return out


def run_streams(trace: RoutingTrace, batch: int, plan: CachePlan,
                predictions: list[tuple[int, int, list[int]]] | None = None) -> list[RunStream]:
    """One RunStream per cache (L per-layer caches, or one shared), built from the trace of a run."""
    L, E, step_size = trace.num_layers, trace.num_experts, plan.step_size
    if len(trace.seqs) % batch:
        raise ValueError(f"trace has {len(trace.seqs)} sequences, not a multiple of the batch size {batch}")
    pred = {(f, layer): ids for f, layer, ids in (predictions or [])}
    n_caches = L if plan.scope == "layer" else 1
    events: list[list[tuple]] = [[] for _ in range(n_caches)]
    steps: list[list[list[int]]] = [[] for _ in range(n_caches)]
    phases: list[list[bool]] = [[] for _ in range(n_caches)]
    for f in range(len(trace.seqs) // batch):
        seqs = trace.seqs[f * batch:(f + 1) * batch]
        for layer in range(L):
            c, off = (layer, 0) if plan.scope == "layer" else (0, layer * E)
            ids = np.unique(np.concatenate([s[layer].ravel() for s in seqs]))
            active = [int(e) for e in ids if e >= 0]
            groups = [active[i:i + step_size] for i in range(0, len(active), step_size)]
            if (f, layer) in pred and plan.scope == "layer":
                events[c].append(("prefetch", [off + e for e in pred[(f, layer)]], layer))
            for gi, g in enumerate(groups):
                keys = [off + e for e in g]
                events[c].append(("step", keys, layer))
                steps[c].append(keys)
                phases[c].extend([f > 0] * len(keys))
                # The shared cache: the next layer's prefetch is issued inside this layer's first step.
                if gi == 0 and plan.scope == "shared" and (f, layer + 1) in pred:
                    events[c].append(("prefetch", [(layer + 1) * E + e for e in pred[(f, layer + 1)]], layer + 1))
                events[c].append(("end", [], layer))
    return [RunStream(_pad(steps[c], step_size), np.array(phases[c], dtype=bool), events[c]) for c in range(n_caches)]


def simulate_predictive(events: list[tuple], C: int) -> tuple[np.ndarray, dict[str, int]]:
    """LRU with prefetch, event by event (see moekit.offload.cache for the rules): returns the hit
    flag of every request and the prefetch counters."""
    from collections import OrderedDict

    cache: OrderedDict[int, int | None] = OrderedDict()  # key -> target layer of an unused prefetch; LRU first
    hits: list[bool] = []
    n = {"prefetch_loads": 0, "useful_prefetches": 0, "wasted_prefetches": 0, "demand_loads": 0}
    step: set[int] = set()

    def evict(protected: set[int]) -> bool:
        for key in cache:
            if key not in protected:
                if cache.pop(key) is not None:
                    n["wasted_prefetches"] += 1
                return True
        return False

    for kind, ids, layer in events:
        if kind == "prefetch":
            fresh: set[int] = set()
            for key in ids:
                if key in cache:
                    cache.move_to_end(key)
                    continue
                if len(cache) >= C and not evict(step | fresh):
                    break
                cache[key] = layer
                fresh.add(key)
                n["prefetch_loads"] += 1
        elif kind == "step":
            step = set(ids)
            for key in sorted(k for k, target in cache.items() if target == layer and k not in step):
                cache[key] = None
                cache.move_to_end(key, last=False)  # an unused prediction: evicted first
                n["wasted_prefetches"] += 1
            for key in ids:
                if key in cache:
                    hits.append(True)
                    if cache[key] is not None:
                        n["useful_prefetches"] += 1
                        cache[key] = None
                    cache.move_to_end(key)
                else:
                    hits.append(False)
                    n["demand_loads"] += 1
                    if len(cache) >= C:
                        evict(step)
                    cache[key] = None
        else:  # end of a step: prefetches for this layer that it did not use are wasted
            step = set()
            for key, target in cache.items():
                if target == layer:
                    cache[key] = None
                    n["wasted_prefetches"] += 1
    return np.array(hits, dtype=bool), n


def simulate_run(trace: RoutingTrace, batch: int, plan: CachePlan, *, hot_keys=None,
                 predictions=None) -> dict:
    """Hit flags of the run's own policy and of set-MIN / bypass-MIN at the same capacity."""
    streams = run_streams(trace, batch, plan, predictions)
    C = plan.capacity
    flags = {"policy": [], "set_min": [], "bypass_min": []}
    extra = {"prefetch_loads": 0, "useful_prefetches": 0, "wasted_prefetches": 0}
    for c, s in enumerate(streams):
        if plan.policy == "lru":
            res = simulate_lru(s.requests_QK, C).hit_N
        elif plan.policy == "lfu":
            res = simulate_lfu(s.requests_QK, C).hit_N
        elif plan.policy == "static":
            res = simulate_static(s.requests_QK, max(plan.hot_capacity, 1),
                                  np.asarray(hot_keys[c], dtype=np.int64)).hit_N
        else:
            res, counters = simulate_predictive(s.events, C)
            for k in extra:
                extra[k] += counters[k]
        flags["policy"].append(res)
        flags["set_min"].append(set_min(s.requests_QK, C).hit_N)
        flags["bypass_min"].append(bypass_min(s.requests_QK, C).hit_N)
    decode = [s.decode_N for s in streams]
    out = {"streams": streams, "flags": flags, "decode": decode, **extra}
    for name, per_cache in flags.items():
        hits = sum(int(f[d].sum()) for f, d in zip(per_cache, decode, strict=True))
        req = sum(int(d.sum()) for d in decode)
        out[f"{name}_decode_hits"] = hits
        out[f"{name}_decode_requests"] = req
        out[f"{name}_hit_rate"] = hits / req if req else float("nan")
    return out
