"""`analyze(trace, out_dir)`: every routing metric of a trace, `metrics.json` and a self-contained
`report.html` (plots embedded as base64 PNG, no script, no network).

Stages:
  1. load the trace (a RoutingTrace or a trace file) and choose the capacity unit k (the mean
     experts per token, rounded);
  2. split the work into independent tasks and run them on `workers` processes, longest first,
     with a tqdm bar: basic statistics, SRP(n) with bootstrap intervals, the per-layer caches
     (every policy and every C from k to 8k in one Mattson pass, stack.py), one task per
     (policy, C) of the whole-model cache (heap simulators, cache.py), prefetch recall;
  3. gather `metrics.json` and draw the plots with matplotlib's Agg backend into one HTML page;
  4. write `metrics.json`, `report.html` and the trace (`trace.npz`) as one set: into a temporary
     sibling directory, then one rename (moekit.utils.io.replace_dir). The output directory must be
     absent, empty or an earlier moekit report (marker kind "report"); a failure or Ctrl-C leaves it
     as it was. Ctrl-C terminates the worker processes at once (queued work is cancelled).

Definitions: docs/analysis-metrics.md; how to read the page: docs/analyze.md.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import multiprocessing
import os
import shutil
import signal
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from moekit.analysis import cache as cache_mod
from moekit.analysis.metrics import (
    RoutingTrace,
    affinity,
    affinity_prefetch_recall,
    domain_distributions,
    domain_divergence,
    experts_per_token,
    experts_per_token_by_domain,
    gate_prefetch_precision,
    gate_prefetch_recall,
    load_stats,
    srp_bootstrap,
    srp_random_baseline,
)
from moekit.analysis.stack import stack_hit_curves
from moekit.analysis.tracefile import check_memory, load_trace, save_trace
from moekit.errors import DataError
from moekit.utils.io import (
    atomic_write_text,
    check_writable_dir,
    fsync_file,
    remove_debris,
    replace_dir,
    tmp_path,
    writing,
)

__all__ = ["AnalysisConfig", "analyze", "check_report_dir", "compute_metrics", "render_html", "static_hits"]

BOUNDS = ("set_min", "bypass_min")
BOUND_LABELS = {"set_min": "set_min (optimum keeping each step's experts; bounds LRU, LFU)",
                "bypass_min": "bypass_min (optimal bound of every policy here)"}
KIND = "report"  # ownership marker kind of an analyze output directory (moekit.utils.io)
TRACE_FILE = "trace.npz"


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
        names, js_DDL = domain_divergence(trace)
        dist = domain_distributions(trace)
        D = len(names)
        pairs = [(a, b) for a in range(D) for b in range(a + 1, D)]
        out["specialisation"] = {
            "domains": names, "dist_DLE": np.stack([dist[d] for d in names]), "js_DDL": js_DDL,
            "mean_pairwise_js_L": (np.mean([js_DDL[a, b] for a, b in pairs], axis=0) if pairs
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
    req_LNK = np.stack(cache_mod.layer_requests(trace))
    policies = [("lru", 1), ("lfu", 1)] + [("sch", n) for n in cfg.sch_n] + [("set_min", 1), ("bypass_min", 1)]
    C_list = list(range(k_ref, cfg.max_multiple * k_ref + 1))
    curves = stack_hit_curves(req_LNK, trace.num_experts, max(C_list), policies)
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


# ----------------------------------------------------------------------------- plots


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _integer_ticks():
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)  # layers are whole numbers


def _arr(x) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in x], dtype=np.float64) if not isinstance(x[0], list) \
        else np.array([[np.nan if v is None else v for v in row] for row in x], dtype=np.float64)


def _plots(m: dict) -> dict[str, str]:
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    L, E = m["trace"]["num_layers"], m["trace"]["num_experts"]
    plots: dict[str, str] = {}

    counts = _arr(m["load"]["counts_LE"])
    mean = counts.mean(axis=1, keepdims=True)
    fig, ax = plt.subplots(figsize=(min(14, 3 + E * 0.12), 1.5 + L * 0.25))
    im = ax.imshow(counts / np.where(mean > 0, mean, 1), aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set(xlabel="expert", ylabel="layer", title="Load per expert (tokens / mean tokens per expert)")
    fig.colorbar(im, ax=ax, label="load / mean")
    plots["load"] = _png(fig)

    fig, ax = plt.subplots(figsize=(7, 3.8))
    layers = np.arange(L)
    ax.plot(layers, _arr(m["experts_per_token"]["mean_L"]), "k-o", lw=2, label="all")
    for d, v in m["experts_per_token"]["by_domain"].items():
        ax.plot(layers, _arr(v["mean_L"]), marker=".", label=d)
    ax.set(xlabel="layer", ylabel="experts per token (mean)", title="Experts per token by layer and domain")
    ax.xaxis.set_major_locator(_integer_ticks())
    ax.legend(fontsize=8, ncol=2)
    ax.grid(alpha=0.3)
    plots["experts_per_token"] = _png(fig)

    spec = m.get("specialisation")
    if spec:
        dist = np.array(spec["dist_DLE"], dtype=np.float64)  # (D, L, E)
        D = dist.shape[0]
        fig, axes = plt.subplots(2, 1, figsize=(min(16, 4 + L * E * 0.01), 2.2 + 0.3 * D + 2.5),
                                 gridspec_kw={"height_ratios": [max(1.0, 0.3 * D), 1.6]})
        im = axes[0].imshow(dist.reshape(D, L * E) * E, aspect="auto", cmap="magma", interpolation="nearest",
                            vmax=max(2.0, float(np.nanpercentile(dist * E, 99))))
        for layer in range(1, L):
            axes[0].axvline(layer * E - 0.5, color="w", lw=0.5)
        axes[0].set_yticks(range(D), spec["domains"])
        axes[0].set(xlabel="layer x expert (white lines separate layers)",
                    title="Domain specialisation: share of the domain's assignments x E (1 = uniform)")
        fig.colorbar(im, ax=axes[0], label="share x E")
        axes[1].plot(layers, _arr(spec["mean_pairwise_js_L"]), "o-")
        axes[1].axhline(math.log(2), ls=":", c="gray", label="ln 2 (disjoint experts)")
        axes[1].set(xlabel="layer", ylabel="JS divergence (nats)", title="Mean pairwise divergence between domains")
        axes[1].xaxis.set_major_locator(_integer_ticks())
        axes[1].legend(fontsize=8)
        axes[1].grid(alpha=0.3)
        fig.tight_layout()
        plots["specialisation"] = _png(fig)

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True)
    for ax, scope, title in [(axes[0], "per_layer", "One cache of C experts per layer"),
                             (axes[1], "whole_model", "One whole-model cache of L x C experts (same memory)")]:
        c = m["cache"][scope]
        x = np.array(c["C_over_k"], dtype=np.float64)
        for label, v in c["policies"].items():
            y = _arr(v["cold"])
            if label in BOUNDS:
                ax.plot(x, y, "k--" if label == "set_min" else "k:", lw=2.2, marker=".",
                        label=BOUND_LABELS[label])
            else:
                ax.plot(x, y, marker="o", ms=3, label=label)
        ax.set(xlabel="cache size per layer C / k", title=title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("hit rate (cold cache)")
    plots["cache"] = _png(fig)

    ns = np.array(m["srp"]["n"], dtype=np.float64)
    val = _arr([m["srp"]["model"][str(int(n))]["value"] for n in ns])
    # Every n longer than every sequence (a one-token trace): no window, no plot; the page says so.
    if not np.isnan(val).all():
        fig, ax = plt.subplots(figsize=(7, 3.8))
        lo = _arr([m["srp"]["model"][str(int(n))]["lo"] for n in ns])
        hi = _arr([m["srp"]["model"][str(int(n))]["hi"] for n in ns])
        ax.errorbar(ns, val, yerr=[np.nan_to_num(val - lo), np.nan_to_num(hi - val)], fmt="o-", capsize=4,
                    label="whole model (95% bootstrap interval)")
        per_layer = np.array([_arr(m["srp"]["layer"][str(int(n))]["value_L"]) for n in ns])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # n longer than every sequence: all-nan column
            ax.fill_between(ns, np.nanmin(per_layer, axis=1), np.nanmax(per_layer, axis=1), alpha=0.2,
                            label="range over layers")
        ax.axhline(m["srp"]["random_baseline"], ls=":", c="gray", label="random routing 2k/(E+k)")
        ax.set_xscale("log", base=2)
        ax.set(xlabel="segment length n (tokens)", ylabel="SRP(n)", title="Segment routing best performance")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        plots["srp"] = _png(fig)

    aff = m.get("affinity")
    if aff:
        A = np.array(aff["A_JEE"], dtype=np.float64)
        pairs = sorted({0, A.shape[0] // 2, A.shape[0] - 1})
        fig, axes = plt.subplots(1, len(pairs), figsize=(4.2 * len(pairs), 3.9), squeeze=False)
        for ax, j in zip(axes[0], pairs, strict=True):
            im = ax.imshow(A[j], cmap="viridis", interpolation="nearest", vmin=0)
            ax.set(xlabel=f"expert at layer {j + 1}", ylabel=f"expert at layer {j}",
                   title=f"P(next | current), layers {j}->{j + 1}")
            fig.colorbar(im, ax=ax, fraction=0.046)
        fig.tight_layout()
        plots["affinity"] = _png(fig)

    pf = m["prefetch"]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for kind, style in (("gate", "o-"), ("affinity", "s--")):
        rec = pf.get(kind) or {}
        for d, r in sorted(rec.items(), key=lambda kv: int(kv[0])):
            ax.plot(layers, _arr(r), style, ms=4, label=f"{kind}, {d} layer{'s' if int(d) > 1 else ''} ahead")
    ax.axhline(pf["random_baseline"], ls=":", c="gray", label="random k/E")
    ax.set(xlabel="target layer", ylabel="recall", title="Prefetch recall of the experts a layer executes",
           ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    plots["prefetch"] = _png(fig)
    return plots


# ----------------------------------------------------------------------------- HTML

_CSS = """body{font-family:system-ui,sans-serif;max-width:1150px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;font-size:.9em;margin:.6em 0}td,th{border:1px solid #ddd;padding:.25em .6em;
text-align:right}th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}
img{max-width:100%;display:block;margin:.8em 0}p.note{color:#555;font-size:.92em}"""


def _fmt(x, digits: int = 3) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _nanmean(x) -> float:
    a = _arr(x)
    return float(np.mean(a[~np.isnan(a)])) if np.any(~np.isnan(a)) else math.nan


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _cache_table(c: dict) -> str:
    xs = c["C_over_k"]
    pick = [i for i, x in enumerate(xs) if x in (1, 2, 4, 8)] or list(range(len(xs)))
    header = ["policy"] + [f"C/k={xs[i]:g} cold / warm" for i in pick]
    rows = [[label] + [f"{_fmt(v['cold'][i])} / {_fmt(v['warm'][i])}" for i in pick]
            for label, v in c["policies"].items()]
    return _table(header, rows)


def render_html(m: dict, plots: dict[str, str]) -> str:
    t = m["trace"]

    def img(key: str, alt: str) -> str:
        if key not in plots:
            return f"<p class='note'>{html.escape(alt)}: not available for this trace.</p>"
        return f'<img class="plot" id="plot-{key}" alt="{html.escape(alt)}" src="data:image/png;base64,{plots[key]}">'

    ls = m["load"]
    summary = _table(["quantity", "value"], [
        ["layers L / experts E", f"{t['num_layers']} / {t['num_experts']}"],
        ["sequences / tokens / (token, layer) rows", f"{t['num_sequences']} / {t['num_tokens']} / {t['num_rows']}"],
        ["mean experts per token (k) / max", f"{_fmt(t['mean_experts_per_token'])} / {t['k_max']}"],
        ["domains", ", ".join(f"{d} ({n})" for d, n in (t["domains"] or {}).items()) or "unlabelled"],
        ["routers", ", ".join((t.get("meta") or {}).get("routers", [])) or "–"],
        ["load CV (mean over layers)", _fmt(_nanmean(ls["cv_L"]))],
        ["load Gini (mean over layers)", _fmt(_nanmean(ls["gini_L"]))],
        ["normalised entropy (mean over layers)", _fmt(_nanmean(ls["norm_entropy_L"]))],
        ["SRP random baseline 2k/(E+k)", _fmt(m["srp"]["random_baseline"])],
        ["analysis wall time", f"{m['timing_s']['wall']:.1f} s"],
    ])
    srp_rows = [[n, _fmt(v["value"]), f"[{_fmt(v['lo'])}, {_fmt(v['hi'])}]"] for n, v in m["srp"]["model"].items()]
    pf = m["prefetch"]
    pf_rows = []
    for kind in ("gate", "affinity"):
        precision = (pf.get("gate_precision") or {}) if kind == "gate" else (pf.get(kind) or {})
        for d, r in sorted((pf.get(kind) or {}).items(), key=lambda kv: int(kv[0])):
            pf_rows.append([kind, d, _fmt(_nanmean(r)), _fmt(_nanmean(precision.get(d, [None])))])
    sections = [
        ("Load per expert", img("load", "load heatmap, layer by expert"),
         "Tokens routed to each expert of each layer divided by the layer's mean: 1 is a perfectly balanced "
         "expert, bright cells are hot experts, dark ones idle."),
        ("Experts per token", img("experts_per_token", "experts per token by layer and domain"),
         "Mean number of executed experts per token at each layer, overall and per domain (constant k for "
         "top-k routers; varies with top-p, null-expert and other dynamic routers)."),
        ("Domain specialisation", img("specialisation", "domain by expert specialisation heatmap"),
         "Each domain's share of assignments per expert, times E (1 = what uniform routing gives), and the "
         "mean pairwise Jensen-Shannon divergence between domains per layer (0 identical, ln 2 disjoint)."),
        ("Expert caches", img("cache", "hit rate versus cache size for every policy")
         + _cache_table(m["cache"]["per_layer"]) + "<p class='note'>whole-model cache:</p>"
         + _cache_table(m["cache"]["whole_model"]),
         "Hit rate against cache size in units of k for LRU, LFU, SCH(n), the oracle static hot set and the "
         "two optimal caches (set-MIN dashed, bypass-MIN dotted). Plots use the cold convention; tables show "
         "cold / warm. set-MIN is the best a cache can do when all of a token's experts must be resident: "
         "it bounds LRU and LFU. SCH(n) is the paper's (arXiv 2505.16056, as its authors' code computes it): "
         "a later expert of a token may evict an earlier one, so it can exceed set-MIN; nothing that only "
         "chooses what to keep, SCH and static included, can exceed bypass-MIN. '–': LRU, LFU and set-MIN "
         "have no value when C is below the most experts one step requests (k_max)."),
        ("Segment routing locality", img("srp", "SRP versus segment length")
         + _table(["n", "SRP (whole model)", "95% interval"], srp_rows),
         "SRP(n): the best F1 of predicting one fixed expert group for each window of n tokens. Far above the "
         "random baseline means routing is stable over segments and per-segment caching pays."),
        ("Cross-layer affinity", img("affinity", "inter-layer affinity heatmaps"),
         "P(expert p at layer j+1 | expert i at layer j) for three layer pairs: concentrated rows mean the "
         "next layer's experts are predictable from this layer's."),
        ("Prefetch recall", img("prefetch", "prefetch recall by layer and distance")
         + _table(["predictor", "layers ahead", "mean recall", "mean precision"], pf_rows),
         pf["note"]),
    ]
    body = "".join(f"<h2>{html.escape(title)}</h2><p class='note'>{html.escape(note)}</p>{content}"
                   for title, content, note in sections)
    title = "moekit routing analysis"
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{title}</title>"
            f"<style>{_CSS}</style></head><body><h1>{title}</h1>{summary}{body}"
            "<p class='note'>Every number is in metrics.json next to this page; definitions in "
            "docs/analysis-metrics.md.</p></body></html>")


# ----------------------------------------------------------------------------- entry point


def check_report_dir(out_dir: str | os.PathLike) -> None:
    """Refuse (NotOwnedError) an output directory that exists, is not empty and is not a moekit report."""
    check_writable_dir(out_dir, KIND, "moekit analyze")


def analyze(trace_or_path: RoutingTrace | str | os.PathLike, out_dir: str | os.PathLike,
            cfg: AnalysisConfig | None = None, progress: bool = True) -> dict:
    """Compute every metric of `trace_or_path` and write `out_dir/metrics.json`, `out_dir/report.html`
    and the trace `out_dir/trace.npz` as one set (module doc, stage 4). Returns the metrics dict.

    Raises NotOwnedError (out_dir holds other files), DataError / TraceFormatError (an empty,
    damaged or oversized trace), FileNotFoundError, OSError (e.g. a full disk: nothing is written).
    """
    out = Path(out_dir)
    check_report_dir(out)
    source = None if isinstance(trace_or_path, RoutingTrace) else Path(trace_or_path)
    trace = trace_or_path if source is None else load_trace(source)
    m = compute_metrics(trace, cfg, progress)
    t0 = time.perf_counter()
    plots = _plots(m)
    page = render_html(m, plots)
    m["timing_s"]["plots_and_html"] = time.perf_counter() - t0
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_debris(out.parent, out.name)  # the temporary set of a killed analyze
    tmp = tmp_path(out)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    with writing(out, tmp):  # a full disk names the target
        try:
            if source is None:
                save_trace(trace, tmp / TRACE_FILE)
            else:
                shutil.copyfile(source, tmp / TRACE_FILE)
                fsync_file(tmp / TRACE_FILE)
            atomic_write_text(tmp / "metrics.json", json.dumps(m, indent=1))
            atomic_write_text(tmp / "report.html", page)
            replace_dir(tmp, out, KIND, "moekit analyze")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return m
