"""MoE layer speed against a dense FFN of the same active FLOPs and against transformers.

For each case (dtype, E, T, pass) it prints one JSON object:
  moekit_ms      moekit MoELayer (router + dispatch + experts), median of --repeats after warm-up;
                 all implementations of a case are timed round-robin, one run each in turn
  dense_ms       one dense SwiGLU FFN of the same width on T*k rows (the same active FLOPs), with
                 the same GEMM compute dtype as moekit (so ratio_dense isolates routing overhead)
  dense_native_ms the dense FFN with plain torch ops in the case dtype (bf16 forward only)
  hf_<impl>_ms   transformers' OlmoeSparseMoeBlock (same weights, same routing rule) per experts
                 implementation (eager, grouped_mm, batched_mm where its T*k weight gather fits)
  hf_ms          the fastest of those;  ratio_dense = moekit/dense,  ratio_hf = moekit/hf
  bw_floor_ms    (T <= 16) bytes of the distinct experts' weights the routing touches / memory
                 bandwidth measured in this run (best of a large GEMV and a large sum)
  peak_rss_mb    peak resident memory of this process so far
  cold_cache     true for T <= 16: caches are flushed before every timed run (weights come from memory)
All measurements of one case are taken in one process, one after another.
Dynamic cases ("bench": "layer_dynamic"): a top-p layer with p bisected so that its average experts
per token (avg_k) equals k, against the top-k layer with the same weights: ratio_topk = topp/topk.

Usage: moekit bench layer [--quick] [--out results.jsonl]   (or python benchmarks/layer.py ...)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform

import torch
from transformers import OlmoeConfig
from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock

import moekit
from moekit.bench.timing import append_json_lines, load_average, median_s, peak_rss_mb
from moekit.ops.ffn import expert_ffn
from moekit.ops.grouped import compute_dtype

HF_IMPLS = ("eager", "grouped_mm", "batched_mm")
BATCHED_MM_LIMIT_BYTES = 4 * 2**30  # batched_mm gathers T*k copies of an expert's weights


def measure_bandwidth_gbs() -> float:
    """Best read bandwidth seen streaming a 256 MiB fp32 matrix (GEMV and sum)."""
    a = torch.randn(8192, 8192)
    v = torch.randn(8192)
    nbytes = a.numel() * a.element_size()
    best_s = min(median_s({"gemv": lambda: torch.mv(a, v), "sum": lambda: a.sum()}, 5).values())
    return nbytes / best_s / 1e9


def make_hf_block(layer: moekit.MoELayer, impl: str) -> OlmoeSparseMoeBlock:
    cfg = layer.cfg
    hf_cfg = OlmoeConfig(hidden_size=cfg.d_model, intermediate_size=cfg.d_expert, num_experts=cfg.num_experts,
                         num_experts_per_tok=round(cfg.router.expected_experts_per_token(cfg.num_experts)), norm_topk_prob=cfg.router.normalizes())
    hf_cfg._experts_implementation = impl
    with torch.device("meta"):
        block = OlmoeSparseMoeBlock(hf_cfg)
    # Share moekit's Parameters: identical weights, no copy.
    block.gate.weight = layer.router.weight
    block.experts.gate_up_proj = layer.experts.gate_up_proj
    block.experts.down_proj = layer.experts.down_proj
    return block


def timed_step(fn, x, backward: bool, params):
    """A zero-argument callable running one forward (no grad) or forward+backward of fn(x)."""
    if not backward:
        def fwd():
            with torch.no_grad():
                fn(x)
        return fwd
    g = torch.randn_like(x)

    def fwd_bwd():
        for p in params:
            p.grad = None
        x.grad = None
        fn(x).backward(g)

    return fwd_bwd


_FLUSH = torch.empty(0)


def flush_caches() -> None:
    """Evict the CPU caches (write 128 MiB) so that every implementation reads its weights from
    memory: the decode situation, and the one the bandwidth floor assumes."""
    global _FLUSH
    if _FLUSH.numel() == 0:
        _FLUSH = torch.empty(32 * 2**20)
    _FLUSH.fill_(1.0)


def median_ms_interleaved(steps: dict, repeats: int, cold: bool = False) -> dict[str, float]:
    """Median milliseconds of each step, timed round-robin (moekit.bench.timing). cold=True flushes the
    caches before each timed run (implementations share weights, so one would otherwise find them in
    cache after another)."""
    secs = median_s(steps, repeats, before_each=flush_caches if cold else None)
    return {name: 1e3 * s for name, s in secs.items()}


def run_case(dtype, E, T, backward, args, bandwidth_gbs):
    D, Fw, k = args.d_model, args.d_expert, args.k
    torch.manual_seed(0)
    cfg = moekit.MoEConfig(d_model=D, d_expert=Fw, num_experts=E, router=moekit.RouterConfig(k=k))
    layer = moekit.MoELayer(cfg).to(dtype)
    # A trained router is far from uniform, but random weights at this scale route near-uniformly,
    # which is the case that touches the most experts.
    params = list(layer.parameters())
    x = torch.randn(T, D, dtype=dtype, requires_grad=backward)
    res = {"bench": "layer", "dtype": str(dtype).replace("torch.", ""), "T": T, "E": E, "k": k, "D": D, "F": Fw,
           "pass": "fwd+bwd" if backward else "fwd",
           "gemm_compute_dtype": str(compute_dtype(dtype, x.device)).replace("torch.", "")}
    steps = {"moekit_ms": timed_step(layer, x, backward, params)}

    # Dense FFN with the same active FLOPs: T*k rows through one expert's weights.
    cdt = compute_dtype(dtype, x.device)
    w_gu = layer.experts.gate_up_proj.detach()[0].clone().requires_grad_(backward)
    w_d = layer.experts.down_proj.detach()[0].clone().requires_grad_(backward)
    x_rows = torch.randn(T * k, D, dtype=dtype, requires_grad=backward)

    def dense(x_MD, c=cdt):
        return expert_ffn(x_MD.to(c), w_gu.to(c), w_d.to(c), "swiglu").to(x_MD.dtype)

    steps["dense_ms"] = timed_step(dense, x_rows, backward, [w_gu, w_d])
    if dtype != cdt and not backward:
        steps["dense_native_ms"] = timed_step(lambda t: dense(t, dtype), x_rows, False, [])

    for impl in HF_IMPLS:
        if impl == "batched_mm" and T * k * 3 * D * Fw * x.element_size() * (3 if backward else 1) > BATCHED_MM_LIMIT_BYTES:
            continue
        if impl == "eager" and backward and dtype == torch.bfloat16 and args.skip_slow_hf:
            continue
        block = make_hf_block(layer, impl)
        steps[f"hf_{impl}_ms"] = timed_step(lambda t, b=block: b(t.unsqueeze(0)).squeeze(0), x, backward, params)
    res["cold_cache"] = T <= 16
    res.update(median_ms_interleaved(steps, args.repeats, cold=T <= 16))
    hf = {kk: v for kk, v in res.items() if kk.startswith("hf_") and kk.endswith("_ms")}
    res["hf_ms"] = min(hf.values())
    res["hf_fastest"] = min(hf, key=hf.get)[3:-3]
    res["ratio_dense"] = res["moekit_ms"] / res["dense_ms"]
    res["ratio_hf"] = res["moekit_ms"] / res["hf_ms"]
    if "hf_eager_ms" in res:
        res["ratio_hf_eager"] = res["moekit_ms"] / res["hf_eager_ms"]
    if T <= 16:
        with torch.no_grad():
            layer(x)
        touched = int((layer.routing_info().counts_E > 0).sum())
        nbytes = touched * 3 * D * Fw * x.element_size()
        res["experts_touched"] = touched
        res["bw_floor_ms"] = nbytes / (bandwidth_gbs * 1e9) * 1e3
        res["ratio_bw"] = res["moekit_ms"] / res["bw_floor_ms"]
    res["peak_rss_mb"] = round(peak_rss_mb(), 1)
    return {kk: (round(v, 4) if isinstance(v, float) else v) for kk, v in res.items()}


def calibrate_topp(layer: moekit.MoELayer, x: torch.Tensor, target_k: float) -> float:
    """Bisect p so that the top-p layer's average experts per token on x equals target_k."""
    lo, hi = 1e-4, 1.0
    with torch.no_grad():
        for _ in range(30):
            mid = (lo + hi) / 2
            with moekit.route(layer, p=mid):
                layer(x)
            if layer.routing_info().stats()["experts_per_token_mean"] < target_k:
                lo = mid
            else:
                hi = mid
    return (lo + hi) / 2


def run_dynamic_case(dtype, E, T, backward, args):
    """A top-p layer whose average experts per token equals k, against a top-k layer of the same
    shapes and weights (issue: dynamic routing must cost what its experts cost)."""
    D, Fw, k = args.d_model, args.d_expert, args.k
    torch.manual_seed(0)
    topk = moekit.MoELayer(moekit.MoEConfig(d_model=D, d_expert=Fw, num_experts=E,
                                            router=moekit.RouterConfig(k=k))).to(dtype)
    topp = moekit.MoELayer(moekit.MoEConfig(d_model=D, d_expert=Fw, num_experts=E,
                                            router=moekit.RouterConfig(kind="topp"))).to(dtype)
    # Same weights; the top-k router's selection bias (zero, unused here) has no top-p counterpart.
    topp.load_state_dict({n: t for n, t in topk.state_dict().items() if n != "router.e_score_correction_bias"})
    x = torch.randn(T, D, dtype=dtype, requires_grad=backward)
    p = calibrate_topp(topp, x.detach(), k)
    topp.router.cfg = dataclasses.replace(topp.router.cfg, p=p)
    with torch.no_grad():
        topp(x)
    avg_k = topp.routing_info().stats()["experts_per_token_mean"]
    steps = {"topp_ms": timed_step(topp, x, backward, list(topp.parameters())),
             "topk_ms": timed_step(topk, x, backward, list(topk.parameters()))}
    res = {"bench": "layer_dynamic", "dtype": str(dtype).replace("torch.", ""), "T": T, "E": E, "k": k,
           "pass": "fwd+bwd" if backward else "fwd", "p": p, "avg_k": avg_k}
    res.update(median_ms_interleaved(steps, args.repeats))
    res["ratio_topk"] = res["topp_ms"] / res["topk_ms"]
    res["peak_rss_mb"] = round(peak_rss_mb(), 1)
    return {kk: (round(v, 4) if isinstance(v, float) else v) for kk, v in res.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CI-sized run: E=8, T in {1, 16, 512}, fp32, 3 repeats")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--experts", default="8,32,64")
    p.add_argument("--tokens", default="1,16,4096")
    p.add_argument("--backward-tokens", default="4096", help="T values also timed forward+backward")
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--d-expert", type=int, default=1024)
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--skip-slow-hf", action="store_true",
                   help="skip transformers' eager bf16 forward+backward (tens of seconds per run on AVX2 CPUs)")
    p.add_argument("--dynamic-only", action="store_true",
                   help="only the dynamic cases: top-p calibrated to avg k vs top-k (T = the largest --tokens)")
    p.add_argument("--out", help="also append the JSON lines to this file")
    args = p.parse_args(argv)
    if args.quick:
        args.dtypes, args.experts, args.tokens, args.backward_tokens, args.repeats = "float32", "8", "1,16,512", "512", 3
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    bandwidth = measure_bandwidth_gbs()
    machine = {"bench": "machine", "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
               "torch": torch.__version__, "moekit": moekit.__version__, "bandwidth_gbs": round(bandwidth, 2),
               **load_average()}
    lines = [machine]
    print(json.dumps(machine), flush=True)
    T_dyn = max(map(int, args.tokens.split(",")))
    for dtype in dtypes:
        for E in map(int, args.experts.split(",")):
            for backward in (False, True):
                res = run_dynamic_case(dtype, E, T_dyn, backward, args)
                lines.append(res)
                print(json.dumps(res), flush=True)
            if args.dynamic_only:
                continue
            for T in map(int, args.tokens.split(",")):
                passes = [False] + ([True] if str(T) in args.backward_tokens.split(",") else [])
                for backward in passes:
                    res = run_case(dtype, E, T, backward, args, bandwidth)
                    lines.append(res)
                    print(json.dumps(res), flush=True)
    if args.out:
        append_json_lines(args.out, lines)
    return 0


if __name__ == "__main__":
    main()
