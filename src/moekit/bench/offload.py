"""Offloaded inference benchmark: decode speed, hit rates and bytes moved under expert budgets.

A random-weight MoELM whose experts dominate memory (d_model 512, 4 MoE layers, E = 32, k = 2,
d_expert 512, fp32: 403 MB of experts, 3.1 MB per expert) is written to an expert store in a
temporary directory. Then, for budgets {12.5, 25, 50, 100}% x policies {lru, lfu, static,
predictive} (per-layer caches; plus shared caches at 25%), greedy generation runs offloaded from
the store - the model built without its experts (`load_dense_lm`) - and is compared with fully
resident generation of the same model in the same run.

Prints JSON lines:
  {"bench": "machine", ...}       cpu, threads, versions
  {"bench": "store", ...}         store size, write time, slow-tier read bandwidth (page cache warm,
                                  just written; sha256 cost; a read after fadvise(DONTNEED) on the
                                  store's own files, i.e. from disk if the kernel honoured it)
  {"bench": "resident", ...}      fully resident decode tokens/s (measured before and after the sweep)
  {"bench": "offload", ...}       one per (budget, policy, scope): tokens/s relative to resident,
                                  hit rate relative to set-MIN, bytes moved per token relative to
                                  the MIN floor, fraction of the bandwidth ceiling, peak RSS
  {"bench": "targets", ...}       predictive hit rate >= 0.9 x set-MIN at 25%; decode at 50% >= 0.5 x resident

    moekit bench offload                 # the full figure (docs/results/offload-cpu.jsonl)
    moekit bench offload --quick         # E = 16 (201 MB of experts), 32 tokens, 2 budgets; < 2 min
    moekit bench offload --trained RUN   # also the same sweep on a trained moekit run (locality)
(or python benchmarks/offload.py ... in a source checkout)

Tokens are sampled (temperature 1, fixed seed; offloaded and resident runs draw the same tokens,
checked): greedy decoding of a random model falls into repeating one token, whose routing never
changes and would make every cache look perfect.

NOTE: random routers route near-uniformly, so hit rates sit near C / E for every policy; a trained
model (--trained) is where locality, and the gap between policies, shows.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import moekit
from moekit.analysis.trace import TraceRecorder
from moekit.bench.timing import load_average, peak_rss_bytes, reset_peak_rss, status_bytes
from moekit.config import MoEConfig, RouterConfig
from moekit.models.lm import LMConfig, MoELM
from moekit.offload import ExpertStore, offloaded_generate, write_store
from moekit.offload.generate import decode_loop

BUDGETS = ("12.5%", "25%", "50%", "100%")
POLICIES = ("lru", "lfu", "static", "predictive")


def model_config(E: int) -> LMConfig:
    return LMConfig(vocab_size=259, d_model=512, n_layers=4, n_heads=8, max_seq_len=512,
                    moe=MoEConfig(d_model=512, d_expert=512, num_experts=E, router=RouterConfig(kind="topk", k=2)))


def build_model(E: int, seed: int) -> MoELM:
    torch.manual_seed(seed)
    return MoELM(model_config(E)).eval()


def store_bandwidth(store_dir: Path) -> dict:
    """Read every expert once, in file order, into one buffer (the slow tier -> RAM)."""
    out = {}
    for label, verify, cold in (("warm", "never", False), ("warm_sha256", "always", False), ("after_fadvise", "never", True)):
        if cold:
            for f in store_dir.glob("layer-*.safetensors"):
                fd = os.open(f, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # this store's pages only
                finally:
                    os.close(fd)
        with ExpertStore(store_dir, verify=verify) as st:
            buf = torch.empty(st.expert_nbytes, dtype=torch.uint8)
            t0 = time.perf_counter()
            for layer in range(st.num_layers):
                for e in range(st.num_experts):
                    st.read_into(layer, e, buf)
            dt = time.perf_counter() - t0
            out[f"read_{label}_gbs"] = round(st.total_nbytes / dt / 1e9, 3)
    return out


def calibration_trace(model: MoELM, seed: int):
    """Routing of other prompts (not the benchmark's), for the static hot set."""
    ids = torch.randint(0, 259, (4, 64), generator=torch.Generator().manual_seed(seed + 100))
    with torch.no_grad(), TraceRecorder(model, gate_lookahead=0) as rec:
        model(ids)
    return rec.to_trace()


SAMPLING = {"temperature": 1.0, "top_p": 1.0, "seed": 0}  # see main(): greedy decoding of a random model repeats


def resident_run(model, prompt, n) -> tuple[torch.Tensor, float]:
    ids, timing, _ = decode_loop(model, prompt, n, record=True, **SAMPLING)  # the recorder costs the same in both
    lat = timing["latencies_s"]
    return ids, len(lat) / sum(lat)


def sweep(store_dir: Path, prompt, n, ref_ids, resident_tps, hot, bandwidth_gbs, cases, label) -> list[dict]:
    lines = []
    for budget, policy, scope in cases:
        gc.collect()
        reset_peak_rss()
        r = offloaded_generate(store_dir, prompt, n, budget, policy, scope=scope, hot_set=hot, **SAMPLING)
        m = r.metrics
        sim = m["simulated"]
        h = m["hit_rate"]
        moved = m["bytes_moved_per_token"]
        # The bandwidth ceiling is for large experts only (small ones are dominated by per-call costs).
        ceiling = bandwidth_gbs * 1e9 / moved if bandwidth_gbs and moved > 0 else None
        line = {
            "bench": "offload", "model": label, "budget": budget, "policy": policy, "scope": scope,
            "capacity_experts": m["capacity_experts"], "tokens_equal_resident": bool(torch.equal(r.ids_BT, ref_ids)),
            "decode_tokens_per_s": round(m["decode_tokens_per_s"], 2),
            "decode_vs_resident": round(m["decode_tokens_per_s"] / resident_tps, 3),
            "latency_p50_ms": round(m["latency_p50_ms"], 2), "latency_p95_ms": round(m["latency_p95_ms"], 2),
            "prefill_ms": round(1e3 * m["prefill_s"], 1),
            "hit_rate": round(h, 4), "simulated_hit_rate": round(sim["policy_hit_rate"], 4),
            "simulated_equals_measured": sim["hit_flags_equal_measured"],
            "set_min_hit_rate": round(sim["set_min_hit_rate"], 4),
            "bypass_min_hit_rate": round(sim["bypass_min_hit_rate"], 4),
            "hit_vs_set_min": round(h / sim["set_min_hit_rate"], 3) if sim["set_min_hit_rate"] > 0 else None,
            "mb_moved_per_token": round(moved / 1e6, 3),
            "moved_vs_set_min_floor": round(moved / sim["min_bytes_per_token"], 3) if sim["min_bytes_per_token"] else None,
            "moved_vs_bypass_min_floor": (round(moved / sim["bypass_min_bytes_per_token"], 3)
                                          if sim["bypass_min_bytes_per_token"] else None),
            "prefetch_loads": m["prefetch_loads"], "useful_prefetches": m["useful_prefetches"],
            "wasted_prefetch_mb": round(m["wasted_prefetch_bytes"] / 1e6, 2), "late_prefetches": m["late_prefetches"],
            "stall_ms": round(1e3 * m["stall_s"], 1),
            "load_bandwidth_gbs": round(m["load_bandwidth_bytes_per_s"] / 1e9, 3)
            if m["load_bandwidth_bytes_per_s"] == m["load_bandwidth_bytes_per_s"] else None,
            "ceiling_tokens_per_s": round(ceiling, 1) if ceiling else None,
            "fraction_of_ceiling": round(m["decode_tokens_per_s"] / ceiling, 3) if ceiling else None,
            "peak_resident_expert_mb": round(m["peak_resident_expert_bytes"] / 1e6, 1),
            "budget_mb": round(m["budget_bytes"] / 1e6, 1),
            "peak_rss_mb": round(peak_rss_bytes() / 1e6, 1),
        }
        lines.append(line)
        print(json.dumps(line), flush=True)
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="E = 16, 32 new tokens, budgets 25/50%%; under 2 minutes")
    p.add_argument("--tokens", type=int, default=128, help="new tokens per run (default 128)")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trained", metavar="RUN", help="also sweep a trained moekit run directory (a copy of its store "
                                                   "goes to a temporary directory)")
    p.add_argument("--out", help="also write the JSON lines to this file (atomically)")
    args = p.parse_args(argv)
    budgets, policies = BUDGETS, POLICIES
    if args.quick:
        args.experts, args.tokens, args.prompt_len = 16, 32, 16
        budgets = ("25%", "50%")
    tmp = Path(tempfile.mkdtemp(prefix="moekit-offload-bench-"))
    lines = []

    def emit(d):
        lines.append(d)
        print(json.dumps(d), flush=True)

    try:
        emit({"bench": "machine", "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
              "threads": torch.get_num_threads(), "torch": torch.__version__, "moekit": moekit.__version__,
              "python": sys.version.split()[0], "quick": args.quick,
              **load_average(), "note": "a shared machine: absolute times are noisy (load averages above)"})
        model = build_model(args.experts, args.seed)
        t0 = time.perf_counter()
        store_dir = write_store(model, tmp / "store")
        write_s = time.perf_counter() - t0
        with ExpertStore(store_dir) as st:
            info = {"bench": "store", "expert_mb": round(st.expert_nbytes / 1e6, 3),
                    "experts_total_mb": round(st.total_nbytes / 1e6, 1), "layers": st.num_layers, "E": st.num_experts,
                    "k": 2, "dtype": st.manifest["dtype"]}
        n_params = sum(p.numel() * p.element_size() for p in model.parameters())
        info.update({"model_mb": round(n_params / 1e6, 1), "expert_share": round(info["experts_total_mb"] * 1e6 / n_params, 3),
                     "write_s": round(write_s, 2), **store_bandwidth(store_dir),
                     "page_cache": "warm (store just written; system caches not dropped); 'after_fadvise' re-reads "
                                   "after posix_fadvise(DONTNEED) on the store's own files"})
        emit(info)
        bandwidth = info["read_warm_gbs"]
        hot = calibration_trace(model, args.seed)
        prompt = torch.randint(0, 259, (1, args.prompt_len), generator=torch.Generator().manual_seed(args.seed + 1))
        resident_run(model, prompt, 4)  # warm-up
        ref_ids, tps0 = resident_run(model, prompt, args.tokens)
        del model
        gc.collect()
        rss_before_sweep = status_bytes("VmRSS")  # the process without the model: torch, buffers, ...
        cases = [(b, pol, "layer") for b in budgets for pol in policies]
        cases += [("25%", pol, "shared") for pol in ("lru", "predictive")]
        off = sweep(store_dir, prompt, args.tokens, ref_ids, tps0, hot, bandwidth, cases, "random")
        lines += off
        reset_peak_rss()
        model = build_model(args.experts, args.seed)
        ids2, tps1 = resident_run(model, prompt, args.tokens)
        resident_tps = statistics.mean([tps0, tps1])
        emit({"bench": "resident", "model": "random", "decode_tokens_per_s_before": round(tps0, 2),
              "decode_tokens_per_s_after": round(tps1, 2), "same_tokens": bool(torch.equal(ids2, ref_ids)),
              "peak_rss_mb": round(peak_rss_bytes() / 1e6, 1),
              "rss_without_model_mb": round(rss_before_sweep / 1e6, 1),
              "note": "decode_vs_resident in the offload lines divides by the 'before' figure; offload lines' "
                      "peak_rss_mb include rss_without_model_mb"})
        del model
        pred25 = next((x for x in off if x["policy"] == "predictive" and x["budget"] == "25%" and x["scope"] == "layer"), None)
        at50 = [x for x in off if x["budget"] == "50%" and x["scope"] == "layer"]
        emit({"bench": "targets", "model": "random",
              "predictive_hit_vs_set_min_at_25pct": pred25 and pred25["hit_vs_set_min"],
              "predictive_target_met": bool(pred25 and pred25["hit_vs_set_min"] >= 0.9),
              "decode_vs_resident_at_50pct": {x["policy"]: x["decode_vs_resident"] for x in at50},
              "decode_target_met": {x["policy"]: x["decode_vs_resident"] >= 0.5 for x in at50},
              "decode_vs_mean_resident_at_50pct": {x["policy"]: round(x["decode_tokens_per_s"] / resident_tps, 3)
                                                   for x in at50},
              "all_tokens_equal_resident": all(x["tokens_equal_resident"] for x in off),
              "all_simulated_equal_measured": all(x["simulated_equals_measured"] for x in off)})
        if args.trained:
            lines += trained_sweep(Path(args.trained), tmp, budgets, policies, args, emit)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.out:
        from moekit.utils.io import atomic_write_text

        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(args.out), "".join(json.dumps(x) + "\n" for x in lines))
    return 0


def trained_sweep(run: Path, tmp: Path, budgets, policies, args, emit) -> list[dict]:
    """The same sweep on a trained run: small experts, but real routing locality."""
    from moekit.analysis.trace import corpus_batches
    from moekit.data import DOMAINS, load_corpus
    from moekit.train import load_trained

    model, cfg, tok = load_trained(run)
    store_dir = write_store(model, tmp / "trained-store")
    samples = [s for d in DOMAINS for s in load_corpus("validation", d)[:2]]
    with torch.no_grad(), TraceRecorder(model, gate_lookahead=0) as rec:
        for batch in corpus_batches(samples[1:], tok, 64, 4):
            rec.begin_batch(batch.domains, batch.padding_mask_BT)
            model(batch.ids_BT)
    hot = rec.to_trace()
    prompt = torch.tensor([tok.encode(samples[0].text)[:args.prompt_len]])
    ref_ids, tps = resident_run(model, prompt, args.tokens)
    with ExpertStore(store_dir) as st:
        emit({"bench": "resident", "model": f"trained:{run.name}", "decode_tokens_per_s_before": round(tps, 2),
              "experts_total_mb": round(st.total_nbytes / 1e6, 2), "layers": st.num_layers, "E": st.num_experts,
              "router": model.cfg.moe.router.kind, "k": model.cfg.moe.router.expected_experts_per_token(model.cfg.moe.num_experts)})
    del model
    cases = [(b, pol, "layer") for b in budgets for pol in policies]
    return sweep(store_dir, prompt, args.tokens, ref_ids, tps, hot, None, cases, f"trained:{run.name}")


if __name__ == "__main__":
    sys.exit(main())
