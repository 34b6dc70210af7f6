"""The work of `moekit.analysis.analyze`: every metric of a trace as independent tasks on a process pool.

Stages (of `compute_metrics`):
  1. choose the capacity unit k (the mean experts per token, rounded);
  2. split the work into independent tasks and run them on `workers` processes, longest first,
     with a tqdm bar: basic statistics, SRP(n) with bootstrap intervals, the per-layer caches
     (every policy and every C from k to 8k in one Mattson pass, moekit.analysis.stack), one task
     per (policy, C) of the whole-model cache (heap simulators, moekit.analysis.cache), prefetch
     recall; Ctrl-C terminates the worker processes at once (queued work is cancelled);
  3. gather the results into one JSON-ready dict (`metrics.json`).

Definitions: docs/analysis-metrics.md. Legend: the analysis letters of moekit.analysis.
"""

from __future__ import annotations

import math
import multiprocessing
import signal
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from moekit.analysis import cache as cache_mod
from moekit.analysis.difficulty import difficulty_vs_experts
from moekit.analysis.metrics import (
    affinity,
    affinity_prefetch_recall,
    domain_distributions,
    domain_divergence,
    experts_per_token,
    experts_per_token_by_domain,
    gate_prefetch_precision,
    gate_prefetch_recall,
    intra_layer_reuse,
    load_stats,
    srp_bootstrap,
    srp_random_baseline,
)
from moekit.analysis.routing_trace import RoutingTrace
from moekit.analysis.stack import stack_hit_curves
from moekit.analysis.tracefile import check_memory
from moekit.errors import DataError

__all__ = ["AnalysisConfig", "compute_metrics", "static_hits"]


@dataclass
class AnalysisConfig:
    """What `analyze` computes. Capacities are multiples of k, the mean experts per token (rounded)."""

    srp_n: tuple[int, ...] = (4, 16, 64, 256)
    n_boot: int = 200
    sch_n: tuple[int, ...] = (4, 16, 64)        # SCH segment lengths for the per-layer caches
    model_sch_n: tuple[int, ...] = (16,)        # ... and for the whole-model cache (each C costs a pass)
    max_multiple: int = 8                       # per-layer caches: every C from k to max_multiple * k
    model_multiples: tuple[int, ...] = (1, 2, 4, 8)  # whole-model cache: C = L * multiple * k
    prefetch_distance: int = 3
    workers: int = 2
    seed: int = 0

    def validate(self) -> AnalysisConfig:
        if not self.srp_n or min(self.srp_n) < 1:
            raise ValueError(f"AnalysisConfig.srp_n: segment lengths must be >= 1, got {self.srp_n}")
        if min(self.sch_n + self.model_sch_n, default=1) < 1:
            raise ValueError("AnalysisConfig.sch_n / model_sch_n: segment lengths must be >= 1")
        if self.max_multiple < 1 or min(self.model_multiples, default=1) < 1:
            raise ValueError("AnalysisConfig.max_multiple / model_multiples: multiples of k must be >= 1")
        if self.n_boot < 1 or self.workers < 1 or self.prefetch_distance < 0:
            raise ValueError("AnalysisConfig: n_boot and workers must be >= 1, prefetch_distance >= 0")
        return self


# ----------------------------------------------------------------------------- helpers


def static_hits(counts_xE: np.ndarray, C: int) -> tuple[np.ndarray, np.ndarray]:
    """(cold, warm) hits of the oracle static cache of C experts per stream (rows of counts_xE):
    the C most used experts are cached at first use, so each of them misses once (cold); warm
    adds min(C, distinct). Equals cache.simulate_static with hot_set=None, without a pass."""
    srt = -np.sort(-np.asarray(counts_xE), axis=-1)[..., :C]
    cold = np.maximum(srt - 1, 0).sum(axis=-1)
    return cold, cold + np.minimum(C, (np.asarray(counts_xE) > 0).sum(axis=-1))


def _rate(hits, requests):
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(np.asarray(requests) > 0, np.asarray(hits, dtype=np.float64) / np.maximum(requests, 1), np.nan)


def _jsonable(x):
    """numpy -> lists with rounded floats, nan -> None (JSON has no nan)."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, float | np.floating):
        x = float(x)
        return None if math.isnan(x) or math.isinf(x) else round(x, 6)
    return x


# ----------------------------------------------------------------------------- tasks
# Module-level functions so worker processes can run them; the trace is installed once per worker.

_TRACE: RoutingTrace | None = None


def _install(trace: RoutingTrace) -> None:
    global _TRACE
    _TRACE = trace


def _init_worker(trace: RoutingTrace) -> None:
    # Ctrl-C reaches the whole process group: the parent alone handles it (and terminates the workers).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _install(trace)


def _run(fn: Callable, *args) -> tuple[dict, dict[str, float]]:
    """Run a task on the installed trace; timing as wall and CPU seconds (CPU is what another
    process sharing the machine does not inflate)."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn(_TRACE, *args)
    return out, {"wall": round(time.perf_counter() - t0, 3), "cpu": round(time.process_time() - c0, 3)}


def _task_basic(trace: RoutingTrace, k_ref: int, cfg: AnalysisConfig) -> dict:
    ls = load_stats(trace)
    mean_L, hist = experts_per_token(trace)
    out = {
        "load": {"counts_LE": ls.counts_LE, "cv_L": ls.cv_L, "max_over_mean_L": ls.max_over_mean_L,
                 "entropy_L": ls.entropy_L, "norm_entropy_L": ls.norm_entropy_L, "gini_L": ls.gini_L},
        "experts_per_token": {"mean_L": mean_L, "hist_LK": hist, "by_domain": {}},
        "specialisation": None,
    }
    if trace.domains is not None:
        out["experts_per_token"]["by_domain"] = {
            d: {"mean_L": m, "hist_LK": h} for d, (m, h) in sorted(experts_per_token_by_domain(trace).items())}
        names, js_GGL = domain_divergence(trace)
        dist = domain_distributions(trace)
        G = len(names)
        pairs = [(a, b) for a in range(G) for b in range(a + 1, G)]
        out["specialisation"] = {
            "domains": names, "dist_GLE": np.stack([dist[d] for d in names]), "js_GGL": js_GGL,
            "mean_pairwise_js_L": (np.mean([js_GGL[a, b] for a, b in pairs], axis=0) if pairs
                                   else np.full(trace.num_layers, np.nan)),
        }
    # Best static hot set: per layer and over the whole model, every capacity of the sweeps.
    counts_LE = ls.counts_LE
    layer_C = list(range(k_ref, cfg.max_multiple * k_ref + 1))
    model_C = [trace.num_layers * m * k_ref for m in cfg.model_multiples]
    req_L = counts_LE.sum(axis=1)
    hot = {"per_layer": {"C": layer_C, "bound": [], "cold": [], "warm": []},
           "whole_model": {"C": model_C, "bound": [], "cold": [], "warm": []}}
    for C in layer_C:
        top = -np.sort(-counts_LE, axis=1)[:, :C].sum()
        cold, warm = static_hits(counts_LE, C)
        hot["per_layer"]["bound"].append(top / max(req_L.sum(), 1))
        hot["per_layer"]["cold"].append(cold.sum() / max(req_L.sum(), 1))
        hot["per_layer"]["warm"].append(warm.sum() / max(req_L.sum(), 1))
    flat = counts_LE.ravel()
    for C in model_C:
        cold, warm = static_hits(flat, C)
        hot["whole_model"]["bound"].append(-np.sort(-flat)[:C].sum() / max(flat.sum(), 1))
        hot["whole_model"]["cold"].append(float(cold) / max(flat.sum(), 1))
        hot["whole_model"]["warm"].append(float(warm) / max(flat.sum(), 1))
    out["hot_set"] = hot
    if trace.num_layers > 1:
        A_JEE = affinity(trace)
        out["affinity"] = {"A_JEE": A_JEE,
                           # how concentrated each row is: mass of its best next expert / row mass
                           "top1_share_J": _top1_share(A_JEE)}
    else:
        out["affinity"] = None
    return out


def _top1_share(A_JEE: np.ndarray) -> np.ndarray:
    row = A_JEE.sum(axis=2)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(row > 0, A_JEE.max(axis=2) / np.maximum(row, 1e-300), np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a layer with no used expert: nan
        return np.nanmean(np.where(row > 0, share, np.nan), axis=1) if share.size else share


def _task_srp(trace: RoutingTrace, n: int, cfg: AnalysisConfig) -> dict:
    v, lo, hi = srp_bootstrap(trace, n, "layer", n_boot=cfg.n_boot, seed=cfg.seed)
    mv, mlo, mhi = srp_bootstrap(trace, n, "model", n_boot=cfg.n_boot, seed=cfg.seed)
    return {"n": n, "layer": {"value_L": v, "lo_L": lo, "hi_L": hi}, "model": {"value": mv, "lo": mlo, "hi": mhi}}


def _task_layer_caches(trace: RoutingTrace, k_ref: int, cfg: AnalysisConfig) -> dict:
    req_LQK = np.stack(cache_mod.layer_requests(trace))
    policies = [("lru", 1), ("lfu", 1)] + [("sch", n) for n in cfg.sch_n] + [("set_min", 1), ("bypass_min", 1)]
    C_list = list(range(k_ref, cfg.max_multiple * k_ref + 1))
    curves = stack_hit_curves(req_LQK, trace.num_experts, max(C_list), policies)
    total = curves.requests_L.sum()
    out = {"C": C_list, "requests": int(total), "policies": {}}
    for label in curves.policies:
        cold_LC = np.stack([curves.hits(label, C) for C in C_list], axis=1)
        warm_LC = np.stack([curves.warm_hits(label, C) for C in C_list], axis=1)
        out["policies"][label] = {
            "cold": _rate(cold_LC.sum(axis=0), total), "warm": _rate(warm_LC.sum(axis=0), total),
            "cold_LC": _rate(cold_LC, curves.requests_L[:, None]),
        }
    return out


_SIMULATORS = {"lru": cache_mod.simulate_lru, "lfu": cache_mod.simulate_lfu, "sch": cache_mod.simulate_sch,
               "set_min": cache_mod.set_min, "bypass_min": cache_mod.bypass_min}


_MODEL_STREAMS: dict[bool, tuple[RoutingTrace, cache_mod.RequestStream]] = {}


def _model_stream(trace: RoutingTrace, per_token: bool) -> cache_mod.RequestStream:
    """The whole-model request stream, flattened once per process (and its next uses once):
    (token, layer) steps, or one step per token (the paper's SCH)."""
    cached = _MODEL_STREAMS.get(per_token)
    if cached is None or cached[0] is not trace:
        cached = (trace, cache_mod.prepare_requests(cache_mod.model_requests(trace, per_token=per_token)))
        _MODEL_STREAMS[per_token] = cached
    return cached[1]


def _task_model_cache(trace: RoutingTrace, policy: str, n: int, C: int) -> dict:
    # The paper's SCH (arXiv 2505.16056) steps once per token over every layer's experts; the
    # other policies step once per (token, layer) in execution order.
    st = _model_stream(trace, per_token=policy == "sch")
    if policy not in ("bypass_min", "sch") and C < st.k_max:
        return {"policy": policy, "n": n, "C": C, "cold": math.nan, "warm": math.nan}
    kw = {"n": n} if policy == "sch" else {}
    r = _SIMULATORS[policy](st, C, **kw)
    return {"policy": policy, "n": n, "C": C, "cold": r.hit_rate, "warm": r.warm_hit_rate}


def _task_prefetch(trace: RoutingTrace, cfg: AnalysisConfig) -> dict:
    return {"affinity": affinity_prefetch_recall(trace, cfg.prefetch_distance)}


# ----------------------------------------------------------------------------- metrics


def _capacity_unit(trace: RoutingTrace) -> tuple[int, float]:
    """(k, mean experts per token): capacities are multiples of k = round(mean), at least 1."""
    valid = sum(int((s >= 0).sum()) for s in trace.seqs)
    rows = trace.num_tokens * trace.num_layers
    mean_k = valid / rows if rows else 0.0
    return max(1, int(round(mean_k))), mean_k


def compute_metrics(trace: RoutingTrace, cfg: AnalysisConfig | None = None, progress: bool = True) -> dict:
    """Every metric of docs/analysis-metrics.md for `trace`, as a JSON-ready dict."""
    cfg = (cfg or AnalysisConfig()).validate()
    _check_analysable(trace)
    k_ref, mean_k = _capacity_unit(trace)
    L, E = trace.num_layers, trace.num_experts
    # Workers need only the expert ids; weights and gate predictions stay in this process.
    lean = RoutingTrace(trace.seqs, E, trace.domains)
    model_C = [L * m * k_ref for m in cfg.model_multiples]
    tasks: list[tuple[str, Callable, tuple, float]] = []  # (name, fn, args, cost estimate)
    rows = trace.num_tokens * L
    tasks.append(("per_layer_caches", _task_layer_caches, (k_ref, cfg), 10.0 * rows))
    for C in model_C:
        for policy, n in ([("lru", 1), ("lfu", 1)] + [("sch", n) for n in cfg.model_sch_n]
                          + [("set_min", 1), ("bypass_min", 1)]):
            tasks.append((f"model_cache/{policy}{n if policy == 'sch' else ''}/C={C}", _task_model_cache,
                          (policy, n, C), (1.0 if policy == "lru" else 2.5) * rows))
    tasks.append(("prefetch", _task_prefetch, (cfg,), 1.3 * rows))
    tasks.append(("basic", _task_basic, (k_ref, cfg), 1.0 * rows))
    for n in cfg.srp_n:
        tasks.append((f"srp/n={n}", _task_srp, (n, cfg), 0.9 * rows))
    tasks.sort(key=lambda t: -t[3])  # longest first keeps both workers busy to the end

    results: dict[str, dict] = {}
    timings: dict[str, dict[str, float]] = {}
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(tasks), desc="analysing routing", unit="task")
    t0 = time.perf_counter()
    if cfg.workers == 1:
        _install(lean)
        for name, fn, args, _ in tasks:
            results[name], timings[name] = _run(fn, *args)
            if bar is not None:
                bar.update()
    else:
        pool = _pool(cfg.workers, lean)
        try:
            pending = {name: pool.apply_async(_run, (fn, *args),
                                              callback=lambda _r: bar.update() if bar is not None else None)
                       for name, fn, args, _ in tasks}
            pool.close()
            for name, result in pending.items():
                results[name], timings[name] = result.get()
        except BaseException:
            pool.terminate()  # Ctrl-C or a failed task: cancel the queued tasks, stop the running ones now
            raise
        finally:
            pool.join()
    if bar is not None:
        bar.close()
    wall = time.perf_counter() - t0

    metrics: dict = {
        "trace": {
            "num_experts": E, "num_layers": L, "num_sequences": len(trace.seqs), "num_tokens": trace.num_tokens,
            "num_rows": rows, "num_assignments": sum(int((s >= 0).sum()) for s in trace.seqs),
            "mean_experts_per_token": mean_k, "k_max": trace.k_max, "capacity_unit_k": k_ref,
            "domains": (None if trace.domains is None else
                        {d: trace.domains.count(d) for d in sorted(set(trace.domains))}),
            "layer_names": trace.layer_names, "meta": trace.meta or {},
        },
        "config": asdict(cfg),
    }
    metrics.update(results["basic"])
    reuse_L = intra_layer_reuse(trace)
    if reuse_L is not None:  # Chain-of-Experts: the iteration axis (docs/analysis-metrics.md)
        metrics["intra_layer_reuse"] = [None if math.isnan(x) else float(x) for x in reuse_L]
    metrics["srp"] = {
        "n": list(cfg.srp_n),
        "random_baseline": srp_random_baseline(mean_k, E),
        "layer": {str(n): results[f"srp/n={n}"]["layer"] for n in cfg.srp_n},
        "model": {str(n): results[f"srp/n={n}"]["model"] for n in cfg.srp_n},
    }
    # C_over_k of the whole-model cache is per layer (C / (L k)): both sweeps share one x axis.
    model_cache: dict = {"C": model_C, "C_over_k": list(cfg.model_multiples), "policies": {}}
    for name, res in results.items():
        if name.startswith("model_cache/"):
            label = res["policy"] + (str(res["n"]) if res["policy"] == "sch" else "")
            entry = model_cache["policies"].setdefault(label, {"cold": [math.nan] * len(model_C),
                                                               "warm": [math.nan] * len(model_C)})
            i = model_C.index(res["C"])
            entry["cold"][i], entry["warm"][i] = res["cold"], res["warm"]
    hot = results["basic"]["hot_set"]
    per_layer = results["per_layer_caches"]
    per_layer["C_over_k"] = [C / k_ref for C in per_layer["C"]]
    per_layer["policies"]["static"] = {"cold": hot["per_layer"]["cold"], "warm": hot["per_layer"]["warm"]}
    model_cache["policies"]["static"] = {"cold": hot["whole_model"]["cold"], "warm": hot["whole_model"]["warm"]}
    metrics["cache"] = {
        "capacity_unit_k": k_ref,
        "conventions": {
            "cold": "the cache starts empty; every first touch misses",
            "warm": "compulsory misses while fewer than C distinct experts have been seen count as hits "
                    "(arXiv 2505.16056): warm hits = cold hits + min(C, distinct experts)",
            "per_layer": "one cache of C experts per layer; rates pool all layers",
            "whole_model": "one cache shared by all layers with the same total memory: C = L x (C/k) x k",
            "persistence": "the cache persists from one sequence to the next, in trace order",
            "static": "oracle best static set: the C most used experts, loaded at first use",
            "bounds": "set-MIN is optimal among policies that keep all of a step's experts resident and "
                      "bounds LRU and LFU; bypass-MIN bounds every policy here, SCH and static included. SCH "
                      "(arXiv 2505.16056, as ljcleo/moe-lrc computes it) may evict an expert the current token "
                      "requested, so it can exceed set-MIN",
            "sch": "hits judged against the cache as the token began; the token's experts are inserted one "
                   "at a time and a later one may evict an earlier one; whole-model SCH steps once per token "
                   "over every layer's experts (moe-lrc); defined for every C >= 1",
            "missing": "LRU, LFU and set-MIN keep all of a step's experts resident: no value (null) where C is "
                       "below the most experts one step requests (k_max, e.g. a top-p token using more than "
                       "round(mean k) experts)",
        },
        "per_layer": per_layer,
        "whole_model": model_cache,
    }
    # Gate-based recall reads the recorded predictions, which the workers do not get (cheap here).
    gate = {d: r for d, r in gate_prefetch_recall(trace).items() if d <= cfg.prefetch_distance}
    gate_precision = {d: r for d, r in gate_prefetch_precision(trace).items() if d <= cfg.prefetch_distance}
    metrics["prefetch"] = {
        "random_baseline": mean_k / E,
        "affinity": results["prefetch"]["affinity"],
        "gate": gate or None,
        "gate_precision": gate_precision or None,
        "note": ("gate-based recall applies layer l's router (its gate and its own selection rule, "
                 "moekit.routers.predict, the rule offload's predictive prefetch uses) to layer (l-d)'s "
                 "input and needs hidden states: it is recorded by TraceRecorder(gate_lookahead=...) and "
                 "absent from traces made without it; its precision is the share of predicted experts the "
                 "layer runs. Affinity-based recall predicts as many experts as the token runs from the "
                 "experts of layer l-d only (2-fold, by sequence), so its recall equals its precision."),
    }
    # Difficulty against experts reads the token losses, which only traces recorded with them hold.
    metrics["difficulty"] = None if trace.token_loss is None else difficulty_vs_experts(trace)
    metrics["timing_s"] = {"wall": wall, "tasks_cpu_total": sum(t["cpu"] for t in timings.values()),
                           "tasks": dict(sorted(timings.items()))}
    return _jsonable(metrics)


def _pool(workers: int, trace: RoutingTrace):
    # NOTE: fork shares the trace with the workers without pickling it; spawn elsewhere. A
    # multiprocessing.Pool (not concurrent.futures) because terminate() stops running tasks at once.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    return multiprocessing.get_context(method).Pool(workers, initializer=_init_worker, initargs=(trace,))


def _check_analysable(trace: RoutingTrace) -> None:
    """Refuse a trace with no tokens, and one whose arrays would not fit in memory (a header claiming
    10^9 experts), before any work is queued."""
    if trace.num_tokens == 0:
        raise DataError(f"the trace holds no tokens ({len(trace.seqs)} sequence(s), all empty); nothing to "
                        "analyse (record at least one token)")
    L, E = trace.num_layers, trace.num_experts
    T_max = max(s.shape[1] for s in trace.seqs)
    # The largest arrays: cross-layer affinity (L-1) x E x E, per-window SRP counts (T + 1) x (E + 1),
    # and a few (L, E) tables per task.
    need = 8 * ((L - 1) * E * E + (T_max + 2) * (E + 1) + 16 * L * E)
    check_memory(need, f"analysing a trace of E = {E} experts x L = {L} layers")

