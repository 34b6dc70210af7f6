"""Routing-analysis benchmark: time `moekit.analysis.analyze` on a synthetic trace of 1,000,000
(token, layer) rows (E = 64, k = 2, 16 layers, 6 domains), and the cost of recording a trace.

Prints JSON lines:
  {"bench": "analysis", ...}   total time, per-task split, peak memory, trace shape, key results
  {"bench": "recording", ...}  forward time of a stack of MoELayers with and without TraceRecorder
                               (ratio = with / without, measured interleaved in one run)

    python benchmarks/analysis.py            # the full figure (docs/results/analysis-cpu.jsonl)
    python benchmarks/analysis.py --quick    # a small trace, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

import moekit
from moekit.analysis import RoutingTrace, TraceRecorder, analyze, load_trace, save_trace
from moekit.analysis.report import AnalysisConfig


def synthetic_trace(rows: int, L: int = 16, E: int = 64, k: int = 2, seq_len: int = 250, domains: int = 6,
                    stick: float = 0.5, seed: int = 0) -> RoutingTrace:
    """Routing with the structure real traces show: per-domain expert popularity (Dirichlet 0.3),
    segment locality (a token re-uses the previous token's experts with probability `stick`) and
    cross-layer affinity (experts following the previous layer's picks under a fixed permutation
    get a bonus)."""
    rng = np.random.default_rng(seed)
    S = max(1, rows // (L * seq_len))
    logp_GLE = np.log(rng.dirichlet(np.full(E, 0.3), size=(domains, L)) + 1e-9)
    perm_LE = np.stack([rng.permutation(E) for _ in range(L)])
    seqs, labels = [], []
    for s in range(S):
        d = s % domains
        out_LTK = np.empty((L, seq_len, k), dtype=np.int64)
        prev_TK = None
        for layer in range(L):
            logits_TE = logp_GLE[d, layer] + rng.gumbel(size=(seq_len, E))
            if prev_TK is not None:
                follow_TK = perm_LE[layer][prev_TK]
                np.put_along_axis(logits_TE, follow_TK, np.take_along_axis(logits_TE, follow_TK, axis=1) + 2.0, axis=1)
            fresh_TK = np.argsort(-logits_TE, axis=1)[:, :k]
            keep_T = rng.random(seq_len) < stick
            keep_T[0] = False
            src_T = np.maximum.accumulate(np.where(keep_T, 0, np.arange(seq_len)))
            out_LTK[layer] = fresh_TK[src_T]
            prev_TK = out_LTK[layer]
        seqs.append(out_LTK)
        labels.append(f"domain{d}")
    return RoutingTrace(seqs, E, labels, meta={"synthetic": True, "seed": seed})


class _Stack(torch.nn.Module):
    def __init__(self, layers: int, d_model: int, E: int, k: int, d_expert: int):
        super().__init__()
        cfg = moekit.MoEConfig(d_model=d_model, d_expert=d_expert, num_experts=E, router=moekit.RouterConfig(k=k))
        self.layers = torch.nn.ModuleList([moekit.MoELayer(cfg) for _ in range(layers)])

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x)
        return x


def recording_overhead(quick: bool) -> dict:
    torch.manual_seed(0)
    L, D, E, k, F = 4, 256, 64, 2, 512
    B, T = (2, 64) if quick else (8, 256)
    model = _Stack(L, D, E, k, F).eval()
    x = torch.randn(B, T, D)
    reps = 3 if quick else 9
    times: dict[str, list[float]] = {"plain": [], "recorder": [], "recorder_lookahead3": []}
    with torch.no_grad():
        model(x)  # warm-up
        for _ in range(reps):  # interleaved, so background load hits all three alike
            for name in times:
                t0 = time.perf_counter()
                if name == "plain":
                    model(x)
                else:
                    with TraceRecorder(model, gate_lookahead=0 if name == "recorder" else 3) as rec:
                        rec.begin_batch(["x"] * B)
                        model(x)
                        rec.end_batch()
                times[name].append(time.perf_counter() - t0)
    med = {n: statistics.median(v) for n, v in times.items()}
    return {
        "bench": "recording", "layers": L, "d_model": D, "num_experts": E, "k": k, "d_expert": F,
        "batch": B, "seq_len": T, "reps": reps, "forward_s_median": med,
        "overhead_ratio": med["recorder"] / med["plain"],
        "overhead_ratio_lookahead3": med["recorder_lookahead3"] / med["plain"],
    }


def _group(tasks: dict) -> dict:
    """Per-metric split: the whole-model cache tasks summed by policy (wall and CPU seconds)."""
    out: dict[str, dict[str, float]] = {}
    for name, t in tasks.items():
        key = "/".join(name.split("/")[:2]) if name.startswith("model_cache/") else name
        acc = out.setdefault(key, {"wall": 0.0, "cpu": 0.0})
        acc["wall"] = round(acc["wall"] + t["wall"], 3)
        acc["cpu"] = round(acc["cpu"] + t["cpu"], 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a 40,000-row trace instead of 1,000,000")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default=None, help="directory for report.html / metrics.json (default: temporary)")
    args = ap.parse_args()
    rows = 40_000 if args.quick else 1_000_000
    machine = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0],
               "numpy": np.__version__, "torch": torch.__version__,
               "load_avg_1m": os.getloadavg()[0]}

    t0 = time.perf_counter()
    trace = synthetic_trace(rows)
    t_gen = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or os.path.join(tmp, "report")
        t0 = time.perf_counter()
        path = save_trace(trace, os.path.join(tmp, "bench.trace"))
        t_save = time.perf_counter() - t0
        size = os.path.getsize(path)
        t0 = time.perf_counter()
        trace = load_trace(path)
        t_load = time.perf_counter() - t0
        t0 = time.perf_counter()
        m = analyze(trace, out, AnalysisConfig(workers=args.workers), progress=False)
        t_total = time.perf_counter() - t0
    peak_self = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    peak_children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    cache = m["cache"]
    pick = {label: v["cold"] for label, v in cache["per_layer"]["policies"].items()}
    print(json.dumps({
        "bench": "analysis", "rows": m["trace"]["num_rows"], "num_layers": m["trace"]["num_layers"],
        "num_experts": m["trace"]["num_experts"], "k": m["trace"]["capacity_unit_k"],
        "sequences": m["trace"]["num_sequences"], "workers": args.workers,
        "per_layer_C": cache["per_layer"]["C"], "whole_model_C": cache["whole_model"]["C"],
        "total_s": round(t_total, 2),
        "split_s": {"metrics_wall": m["timing_s"]["wall"], "plots_and_html": round(m["timing_s"]["plots_and_html"], 2),
                    "tasks_cpu_total": m["timing_s"]["tasks_cpu_total"], "tasks": _group(m["timing_s"]["tasks"])},
        "trace_file": {"bytes": size, "save_s": round(t_save, 2), "load_s": round(t_load, 2),
                       "generate_s": round(t_gen, 2)},
        "peak_rss_mib": {"main": round(peak_self), "largest_worker": round(peak_children)},
        "per_layer_cold_hit_rate_at_C=k..8k": pick,
        "whole_model_cold_hit_rate_at_C/k=1,2,4,8": {label: v["cold"] for label, v in
                                                     cache["whole_model"]["policies"].items()},
        "machine": machine,
    }))
    print(json.dumps({**recording_overhead(args.quick), "machine": machine}))


if __name__ == "__main__":
    main()
