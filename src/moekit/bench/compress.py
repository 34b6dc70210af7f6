"""Compression benchmark: what pruning, merging and quantising the experts cost in quality and save in bytes.

For each trained run given (`--runs name=DIR,...`), from the run's own checkpoint:
  1. calibrate on the TRAIN split of every domain (`--calib-tokens` per domain; validation is never
     used to choose anything);
  2. build each variant from a copy of the model: REAP and frequency pruning at 25 % and 50 % (the
     same share in every layer), REAP at 50 % ranked over the whole model (--per-layer), M-SMoE and
     HC-SMoE merging to 50 %, int8 and int4 (groups of 64) and mixed precision at 3.5 code bits;
  3. evaluate each on the validation split (bits per byte overall and per domain, `--eval-tokens` per
     domain) and count its expert bytes;
  4. offloaded generation at one fixed byte budget (`--budget` of the UNCOMPRESSED model's expert
     bytes, LRU, per-layer caches; the store holds every variant: per-layer counts, mixed widths at each
     expert's own size, merged layers): hit rate, bytes moved per decoded token, decode tokens/s.
With --hf-random FAMILY, also a wrapped transformers model of that class with random weights (its quality
numbers mean nothing; its bytes, hit rate and speed do).
Also: one expert projection at decode shape through the grouped path's dequantise-then-GEMM against
torch's CPU weight-packed int8 matmul (`torch._weight_int8pack_mm`, per-channel scales), where present.

Prints JSON lines ({"bench": "variant", ...}, {"bench": "packed_int8", ...}) and, with --md FILE, writes
the results table as markdown.

    python benchmarks/compress.py --runs topk=/tmp/cmpr/topk,deepseek=/tmp/cmpr/deepseek,topp=/tmp/cmpr/topp
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time

import torch

from moekit.bench.timing import median_s
from moekit.compress import calibrate, calibration_windows, merge, prune, quantize
from moekit.compress.quantize import expert_bytes
from moekit.data import DOMAINS
from moekit.offload import offloaded_generate, parse_budget
from moekit.train import evaluate, load_trained
from moekit.utils.io import atomic_write_text

VARIANTS = {
    "baseline": lambda m, c: None,
    "prune25 reap": lambda m, c: prune(m, c, 0.25, "reap").summary(),
    "prune25 freq": lambda m, c: prune(m, c, 0.25, "freq").summary(),
    "prune50 reap": lambda m, c: prune(m, c, 0.5, "reap").summary(),
    "prune50 freq": lambda m, c: prune(m, c, 0.5, "freq").summary(),
    "prune50 reap per-layer": lambda m, c: prune(m, c, 0.5, "reap", per_layer=True).summary(),
    "merge50 m-smoe": lambda m, c: merge(m, c, 0.5, "m-smoe").summary(),
    "merge50 hc-smoe": lambda m, c: merge(m, c, 0.5, "hc-smoe").summary(),
    "int8": lambda m, c: quantize(m, "int8", c, 64).summary(),
    "int4": lambda m, c: quantize(m, "int4", c, 64).summary(),
    # one width for every expert (no super expert kept at int8): what the expert store holds
    "int4 unprotected": lambda m, c: quantize(m, "int4", c, 64, protect_super=False).summary(),
    "mixed 3.5": lambda m, c: quantize(m, "mixed:3.5", c, 64).summary(),
}

PROMPT = "def parse(line):\n    "
HF_FAMILIES = {"qwen3_moe": "Qwen3MoeConfig", "mixtral": "MixtralConfig", "olmoe": "OlmoeConfig"}


def tiny_hf_model(family: str):
    """(HFCausalLM over a wrapped transformers model of `family`, byte tokenizer): random weights (seed 0),
    built from its config (nothing downloaded), the presets' shape: d_model 128, 4 MoE layers of 8
    SwiGLU experts of width 256, top-2, byte vocabulary (259)."""
    import transformers

    import moekit.hf
    from moekit.hf.adapters import HFCausalLM, tokenizer_for

    width = {"Qwen3MoeConfig": {"moe_intermediate_size": 256, "num_experts": 8, "head_dim": 32},
             "MixtralConfig": {"intermediate_size": 256, "num_local_experts": 8},
             "OlmoeConfig": {"intermediate_size": 256, "num_experts": 8}}[HF_FAMILIES[family]]
    config = getattr(transformers, HF_FAMILIES[family])(
        vocab_size=259, hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        num_experts_per_tok=2, max_position_embeddings=512, **width)
    torch.manual_seed(0)
    model = moekit.hf.wrap(transformers.AutoModelForCausalLM.from_config(config).eval())
    return HFCausalLM(model).eval(), tokenizer_for(None, config.vocab_size)


def packed_int8_probe(D: int = 128, X: int = 512, rows: int = 4, reps: int = 200) -> dict:
    """Time one (rows, D) x (X, D)^T projection: fp32, dequantise-then-matmul (what the grouped path
    does), and torch._weight_int8pack_mm (per-channel int8 weights)."""
    from moekit.compress.quantize import dequantize, quantize_tensor

    w = torch.randn(X, D)
    x = torch.randn(rows, D)
    packed, scale = quantize_tensor(w, 8, 64)

    steps = {"fp32_us": lambda: x @ w.T, "dequantise_then_matmul_us": lambda: x @ dequantize(packed, scale, 8).T}
    out = {"bench": "packed_int8", "rows": rows, "D": D, "X": X}
    if hasattr(torch, "_weight_int8pack_mm"):
        s_X = w.abs().amax(1) / 127
        q_XD = torch.round(w / s_X[:, None]).to(torch.int8)
        try:
            y = torch._weight_int8pack_mm(x, q_XD, s_X)
            steps["weight_int8pack_mm_us"] = lambda: torch._weight_int8pack_mm(x, q_XD, s_X)
            out["weight_int8pack_mm_max_rel_err"] = float((y - x @ w.T).abs().max() / (x @ w.T).abs().max())
        except RuntimeError as e:
            out["weight_int8pack_mm"] = f"unavailable: {' '.join(str(e).split())[:120]}"
    else:
        out["weight_int8pack_mm"] = "unavailable in this torch build"
    # the competing implementations round-robin (moekit.bench.timing), median per call in microseconds
    out.update({name: t * 1e6 for name, t in median_s(steps, repeats=reps, warmup=1).items()})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default="", help="name=RUN_DIR,... trained moekit runs")
    ap.add_argument("--hf-random", default=None, choices=sorted(HF_FAMILIES),
                    help="also a wrapped transformers model of this class with random weights (tiny_hf_model)")
    ap.add_argument("--eval-tokens", type=int, default=1024, help="validation tokens per domain")
    ap.add_argument("--calib-tokens", type=int, default=512, help="calibration tokens per domain (train split)")
    ap.add_argument("--budget", default="25%", help="expert budget for offloaded generation, of the uncompressed model")
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--variants", default="", help=f"only these variants, comma-separated (default all: {', '.join(VARIANTS)})")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--md", default=None, help="write the markdown table here")
    ap.add_argument("--json", default=None, help="write every JSON line here too")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    chosen = [v.strip() for v in args.variants.split(",") if v.strip()] or list(VARIANTS)
    unknown = sorted(set(chosen) - set(VARIANTS))
    if unknown:
        ap.error(f"--variants: unknown {unknown}; expected some of {list(VARIANTS)}")
    lines = [{"bench": "machine", "cpu": platform.processor() or platform.machine(), "threads": args.threads,
              "torch": torch.__version__, "python": platform.python_version()}]
    print(json.dumps(lines[0]), flush=True)
    sources = [spec.split("=", 1) for spec in args.runs.split(",")] if args.runs else []
    if args.hf_random:
        sources.append((f"hf {args.hf_random} (random)", None))
    for name, run in sources:
        if run is None:
            base, tok = tiny_hf_model(args.hf_random)
            seq_len = 128
        else:
            base, cfg, tok = load_trained(run)
            seq_len = cfg.seq_len
        windows = calibration_windows(tok, "all", seq_len, args.calib_tokens)
        base_bytes = expert_bytes(base)
        budget = parse_budget(args.budget, base_bytes)
        prompt = [tok.bos_id] + tok.encode(PROMPT)
        t0 = time.perf_counter()
        calib = calibrate(base, windows, outputs=True)  # one calibration of the trained model serves every variant
        calib_s = time.perf_counter() - t0
        for variant in chosen:
            build = VARIANTS[variant]
            model = copy.deepcopy(base)
            t0 = time.perf_counter()
            what = build(model, calib)
            compress_s = time.perf_counter() - t0
            ev = evaluate(model, tok, seq_len, args.eval_tokens)
            row = {"bench": "variant", "preset": name, "variant": variant, "did": what,
                   "bpb": ev["bpb"], "per_domain_bpb": {d: ev["per_domain"][d]["bpb"] for d in DOMAINS},
                   "experts_per_token": ev["experts_per_token"], "expert_bytes": expert_bytes(model),
                   "expert_bytes_ratio": expert_bytes(model) / base_bytes, "compress_s": compress_s, "calibrate_s": calib_s,
                   "experts_per_layer": [m.experts.num_experts for m in model.moe_layers()]}
            try:
                res = offloaded_generate(model, prompt, args.new_tokens, budget=budget, policy="lru",
                                         temperature=1.0, seed=0, simulate=False)
                m = res.metrics
                row["offload"] = {"budget_bytes": budget, "hit_rate": m["hit_rate"],
                                  "bytes_per_token": m["bytes_moved_per_token"],
                                  "decode_tokens_per_s": m["decode_tokens_per_s"],
                                  "capacity_experts": m["capacity_experts"]}
            except ValueError as e:  # the store format cannot hold this variant
                row["offload"] = f"not stored: {' '.join(str(e).split())[:160]}"
            lines.append(row)
            print(json.dumps(row), flush=True)
    probe = packed_int8_probe()
    lines.append(probe)
    print(json.dumps(probe), flush=True)
    if args.json:
        atomic_write_text(args.json, "".join(json.dumps(x) + "\n" for x in lines))
    if args.md:
        atomic_write_text(args.md, _table(lines))
    return 0


def _table(lines) -> str:
    rows = [x for x in lines if x["bench"] == "variant"]
    head = ("| preset | variant | val bpb | Δ bpb | " + " | ".join(DOMAINS) +
            " | expert bytes | experts/layer | offload hit | bytes/token | decode tok/s |\n")
    out = head + "|" + "---|" * (head.count("|") - 1) + "\n"
    base = {}
    for r in rows:
        if r["variant"] == "baseline":
            base[r["preset"]] = r["bpb"]
        off = r["offload"]
        if isinstance(off, dict):
            o = f"{off['hit_rate']:.2f} | {off['bytes_per_token'] / 1e3:,.0f} kB | {off['decode_tokens_per_s']:.1f}"
        else:
            o = "not stored | – | –"
        dom = " | ".join(f"{r['per_domain_bpb'][d]:.3f}" for d in DOMAINS)
        out += (f"| {r['preset']} | {r['variant']} | {r['bpb']:.3f} | {r['bpb'] - base[r['preset']]:+.3f} | {dom} | "
                f"{r['expert_bytes'] / 1e6:.2f} MB ({r['expert_bytes_ratio']:.0%}) | "
                f"{'/'.join(map(str, r['experts_per_layer']))} | {o} |\n")
    return out


if __name__ == "__main__":
    sys.exit(main())
