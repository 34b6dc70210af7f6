"""Whole-model CPU speed of moekit.hf-wrapped transformers MoE models against transformers itself.

For each architecture (Mixtral, OLMoE, Qwen2-MoE, Qwen3-MoE, DeepSeek-V3, GPT-OSS, Llama 4) a small random model
(hidden 256, 16 routed experts of width 512, 4 layers, fp32 unless --dtype bfloat16) is built once; transformers runs it
with each of its experts implementations that works on this machine (`eager` plus every entry of
`transformers.integrations.moe.ALL_EXPERTS_FUNCTIONS`: grouped_mm, batched_mm; GPU-only ones fail
their trial run and are listed as skipped), and moekit runs a `moekit.hf.wrap`-ped copy with the
same weights. Every variant is a copy of one model that shares its weight and buffer tensors (the wrapped
model reads transformers' Parameters in place anyway): all read the same memory, so where the pages of one
copy happen to lie cannot make it faster than another (separate copies of the same model differed by up to
5 % in the A/A control). All variants of a case are timed round-robin in this one process (one run each in
turn, median of --repeats after warm-up), so load on the shared machine falls on all alike.

Cases:
  prefill   one forward of a (batch, seq) prompt, no grad; tokens = batch * seq
  decode    greedy generate() of --new-tokens tokens with the KV cache from a short prompt;
            tokens = batch * new tokens (the MoE layers see `batch` tokens per step)

One JSON line per (architecture, case):
  tokens_per_s_moekit          the wrapped model
  tokens_per_s_hf_<impl>       transformers with that experts implementation
  tokens_per_s_hf_best, hf_best_impl   the fastest transformers implementation
  ratio_hf                     moekit time / best transformers time (<= 1.0: moekit at least as fast)
  speedup_vs_hf                best transformers time / moekit time (= 1 / ratio_hf)
  speedup_vs_hf_rounds         [25th percentile, median, 75th percentile] of the same ratio taken per round
                               (each round times every variant once, back to back): the spread says how
                               much of a difference from 1.0 is the machine's noise
  control_impl, control_ratio, control_ratio_rounds
                               an A/A control: a second copy of transformers' model with `control_impl`
                               (grouped_mm where it runs, else eager), timed in the same rounds; control_ratio =
                               copy time / original time (1.0 but for noise: same code, the same weight
                               tensors) and its per-round quartiles. A speedup_vs_hf as far from 1.0 as the
                               control is from 1.0 is not a difference between the libraries
  max_abs_logit_diff           wrapped vs transformers logits on the prefill prompt (same computation)
  moekit_gemm_paths            {"stage/path": count} of moekit's grouped GEMMs in one untimed run of the case
                               (moekit.ops.grouped.record(); "ffn/per_expert": FFNs run expert by expert)
  clock, load_1m/5m/15m         what was timed (--clock wall: elapsed; cpu: the thread's CPU time) and the
                               machine's load average when the line was written
  peak_rss_mb                  peak resident memory of the process so far (all copies of the model
                               live in this one process, so it bounds, not measures, one variant)
The first line describes the machine (numpy_blas_rule: whether moekit.ops.grouped.CPU_NUMPY_BLAS holds, so
that (I, O)-stored experts decode in numpy's OpenBLAS; it holds only while OpenBLAS runs one thread, which
--clock cpu then counts on this thread). An architecture that `moekit.hf.wrap` refuses on this moekit gets one
line {"arch": ..., "refused": "<moekit's message>"} instead of timings.

--device cuda runs every variant on the GPU (each timed step ends with torch.cuda.synchronize(), so the
wall clock counts the GPU's work); the default is cpu.

Usage: moekit bench hf [--quick] [--device cpu|cuda] [--out docs/results/hf-cpu.jsonl]   (or python benchmarks/hf.py ...)
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time

import torch
from transformers import (
    AutoModelForCausalLM,
    DeepseekV3Config,
    GptOssConfig,
    Llama4TextConfig,
    MixtralConfig,
    OlmoeConfig,
    Qwen2MoeConfig,
    Qwen3MoeConfig,
)
from transformers import __version__ as transformers_version
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
from transformers.utils import logging

import moekit
import moekit.hf
from moekit.bench.timing import append_json_lines, load_average, peak_rss_mb, round_robin
from moekit.ops import grouped

logging.set_verbosity_error()
BATCHED_MM_LIMIT_BYTES = 2 * 2**30  # batched_mm gathers a copy of the expert weights for every assignment


def configs(d: int, f: int, e: int, layers: int, vocab: int) -> dict:
    common = dict(vocab_size=vocab, hidden_size=d, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=4, max_position_embeddings=2048, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return {
        "mixtral": MixtralConfig(**common, intermediate_size=f, num_local_experts=e, num_experts_per_tok=2),
        "olmoe": OlmoeConfig(**common, intermediate_size=f, num_experts=e, num_experts_per_tok=2),
        "qwen2_moe": Qwen2MoeConfig(**common, intermediate_size=4 * d, moe_intermediate_size=f,
                                    shared_expert_intermediate_size=2 * f, num_experts=e, num_experts_per_tok=2),
        "qwen3_moe": Qwen3MoeConfig(**common, head_dim=d // 4, intermediate_size=4 * d, moe_intermediate_size=f,
                                    num_experts=e, num_experts_per_tok=2, norm_topk_prob=True),
        "deepseek_v3": DeepseekV3Config(**common, intermediate_size=4 * d, moe_intermediate_size=f, n_routed_experts=e,
                                        num_experts_per_tok=4, n_group=4, topk_group=2, n_shared_experts=1,
                                        routed_scaling_factor=2.5, first_k_dense_replace=1, q_lora_rank=d // 2,
                                        kv_lora_rank=d // 2, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32),
        "gpt_oss": GptOssConfig(**common, intermediate_size=f, num_local_experts=e, num_experts_per_tok=2,
                                head_dim=d // 4, layer_types=["full_attention"] * layers),
        "llama4": Llama4TextConfig(**common, head_dim=d // 4, intermediate_size=f, intermediate_size_mlp=4 * d,
                                   num_local_experts=e, num_experts_per_tok=1, interleave_moe_layer_step=1),
    }


def sharing_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of `model` that holds the same Parameter and buffer tensors (its modules, config and
    settings are its own): variants built from it differ in code only, never in where their weights lie."""
    return copy.deepcopy(model, memo={id(t): t for t in (*model.parameters(), *model.buffers())})


def build(cfg) -> torch.nn.Module:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # transformers' init leaves routers at zero: every score would tie
        for name, p in model.named_parameters():
            if "norm" not in name and p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
    return model


def hf_variants(model, ids) -> tuple[dict, dict]:
    """One copy of the model per experts implementation that runs here; the others with a reason."""
    variants, skipped = {}, {}
    # Experts classes decorated with transformers' @use_experts_implementation carry these flags and dispatch
    # on the setting; others (Llama 4's dense bmm experts) run their own forward whatever it says, so
    # listing each "implementation" would time one code path under several names.
    switchable = any(hasattr(m, "is_concatenated") and hasattr(m, "has_gate") for m in model.modules())
    for impl in ["eager", *ALL_EXPERTS_FUNCTIONS.keys()]:
        if impl != "eager" and not switchable:
            skipped[impl] = f"{type(model).__name__}'s experts have one implementation, their own forward (eager)"
            continue
        m = sharing_copy(model)
        try:
            m.set_experts_implementation(impl)
            with torch.no_grad():
                m(ids[:, :4])
        except Exception as e:  # GPU-only kernels (deepgemm, sonicmoe, ...) fail here on a CPU
            skipped[impl] = f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
            continue
        variants[impl] = m
    return variants, skipped


def run_arch(arch, cfg, args) -> list[dict]:
    device = torch.device(getattr(args, "device", "cpu"))
    dtype = getattr(torch, getattr(args, "dtype", "float32"))
    base = build(cfg).to(device=device, dtype=dtype)
    try:
        wrapped = moekit.hf.wrap(sharing_copy(base))
    except moekit.hf.UnsupportedBlockError as e:  # a family this moekit does not wrap: say so, time nothing
        line = {"bench": "hf", "arch": arch, "refused": str(e)}
        print(json.dumps(line), flush=True)
        return [line]
    layer = moekit.hf.wrapped_blocks(wrapped)[0]
    g = torch.Generator().manual_seed(1)
    prefill_ids = torch.randint(3, cfg.vocab_size, (args.batch, args.seq), generator=g).to(device)
    decode_ids = torch.randint(3, cfg.vocab_size, (args.batch, 8), generator=g).to(device)
    E, k, D, Fw = layer.cfg.num_experts, round(layer.cfg.router.expected_experts_per_token(layer.cfg.num_experts)), layer.cfg.d_model, layer.cfg.d_expert
    variants, unavailable = hf_variants(base, prefill_ids)
    control_impl = "grouped_mm" if "grouped_mm" in variants else "eager"
    control = sharing_copy(variants[control_impl])  # the A/A control (see the module doc)
    with torch.no_grad():
        diff = float((wrapped(prefill_ids).logits - base(prefill_ids).logits).abs().max())

    clock = time.thread_time if getattr(args, "clock", "wall") == "cpu" else None

    def timed(run):
        """A step timed by round_robin (wall clock), or one returning its own CPU seconds (--clock cpu)."""
        if device.type == "cuda":  # the step's kernels run asynchronously: its time ends when the GPU is done
            def synced():
                run()
                torch.cuda.synchronize(device)
            return synced
        if clock is None:
            return run

        def step():
            t0 = clock()
            run()
            return clock() - t0
        return step

    def prefill(m):
        def run():
            with torch.no_grad():
                m(prefill_ids)
        return timed(run)

    def decode(m):
        def run():
            with torch.no_grad():
                m.generate(decode_ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                           do_sample=False, pad_token_id=0)
        return timed(run)

    common = {"bench": "hf", "arch": arch, "hf_class": layer.hf_class, "dtype": str(dtype).removeprefix("torch."), "D": D, "F": Fw, "E": E,
              "k": k, "layers": cfg.num_hidden_layers, "moe_layers": len(moekit.hf.wrapped_blocks(wrapped)),
              "router": layer.cfg.router.describe(), "shared_expert": layer.cfg.num_shared_experts > 0,
              **({"device": "cuda"} if device.type == "cuda" else {})}
    lines = []
    cases = (("prefill", prefill, args.batch * args.seq, {"batch": args.batch, "seq": args.seq}),
             ("decode", decode, args.batch * args.new_tokens,
              {"batch": args.batch, "prompt": 8, "new_tokens": args.new_tokens}))
    for case, make, tokens, shape in cases:
        skipped = dict(unavailable)
        gather_bytes = tokens * k * 3 * D * Fw * dtype.itemsize
        if "batched_mm" in variants and gather_bytes > BATCHED_MM_LIMIT_BYTES:
            skipped["batched_mm"] = f"would gather {gather_bytes / 2**30:.1f} GiB of expert weights"
        steps = {"moekit": make(wrapped),
                 **{f"hf_{impl}": make(m) for impl, m in variants.items() if impl not in skipped},
                 "control": make(control)}
        with grouped.record() as ran:  # which grouped-GEMM paths moekit's step runs: one untimed run of every step
            for run in steps.values():  # (each variant, not moekit alone: the same warm-up for all; only moekit's count)
                run()
        times = round_robin(steps, args.repeats, args.warmup)
        secs = {name: statistics.median(ts) for name, ts in times.items()}
        hf = {name[3:]: s for name, s in secs.items() if name.startswith("hf_")}
        best = min(hf, key=hf.get)
        per_round = sorted(h / m for h, m in zip(times[f"hf_{best}"], times["moekit"], strict=True))
        control_rounds = sorted(c / h for c, h in zip(times["control"], times[f"hf_{control_impl}"], strict=True))
        res = {**common, "case": case, **shape, "tokens": tokens,
               "tokens_per_s_moekit": tokens / secs["moekit"],
               **{f"tokens_per_s_hf_{impl}": tokens / s for impl, s in hf.items()},
               "tokens_per_s_hf_best": tokens / hf[best], "hf_best_impl": best,
               "ratio_hf": secs["moekit"] / hf[best], "speedup_vs_hf": hf[best] / secs["moekit"],
               "speedup_vs_hf_rounds": [round(q, 4) for q in _quartiles(per_round)],
               "control_impl": control_impl, "control_ratio": secs["control"] / hf[control_impl],
               "control_ratio_rounds": [round(q, 4) for q in _quartiles(control_rounds)],
               "moekit_gemm_paths": {f"{stage}/{path}": n for (stage, path), n in sorted(ran.items())},
               "hf_impls_skipped": skipped, "max_abs_logit_diff": diff, "repeats": args.repeats,
               "clock": getattr(args, "clock", "wall"), **load_average(),
               "peak_rss_mb": round(peak_rss_mb(), 1)}
        res = {kk: (round(v, 4) if isinstance(v, float) else v) for kk, v in res.items()}
        res["max_abs_logit_diff"] = float(f"{diff:.2e}")
        print(json.dumps(res), flush=True)
        lines.append(res)
    return lines


def _quartiles(sorted_values: list[float]) -> tuple[float, float, float]:
    """(25th percentile, median, 75th percentile) of a sorted list (one value: itself three times)."""
    if len(sorted_values) == 1:
        return (sorted_values[0],) * 3
    q1, q2, q3 = statistics.quantiles(sorted_values, n=4, method="inclusive")
    return q1, q2, q3


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a short run (about a minute with OMP_NUM_THREADS=1 on 2 idle cores): batch 2 x seq 64, "
                   "4 new tokens, 2 repeats")
    p.add_argument("--archs", default="mixtral,olmoe,qwen2_moe,qwen3_moe,deepseek_v3,gpt_oss,llama4")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--d-expert", type=int, default=512)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall: elapsed time; cpu: this thread's CPU time (needs one thread, OMP_NUM_THREADS=1): "
                        "on a loaded shared machine it counts the work done, not the time spent waiting for a core")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the models run and are timed")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="the models' dtype (all variants alike)")
    p.add_argument("--out", help="also append the JSON lines to this file")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch.cuda.is_available() is False on this machine")
    if args.device == "cuda" and args.clock == "cpu":
        raise SystemExit("--clock cpu times this thread's CPU work; on --device cuda use the wall clock")
    if args.clock == "cpu" and torch.get_num_threads() != 1:
        raise SystemExit(f"--clock cpu times one thread; this process runs {torch.get_num_threads()} (set "
                         "OMP_NUM_THREADS=1)")
    if args.quick:
        args.batch, args.seq, args.new_tokens, args.repeats, args.warmup = 2, 64, 4, 2, 1
    machine = {"bench": "machine", "cpu": platform.processor() or platform.machine(),
               "threads": torch.get_num_threads(), "torch": torch.__version__, "transformers": transformers_version,
               "moekit": moekit.__version__, "quick": args.quick,
               "numpy_blas_rule": grouped.numpy_blas_streams_faster(), **load_average()}
    if args.device == "cuda":
        machine.update(device="cuda", gpu=torch.cuda.get_device_name())
    print(json.dumps(machine), flush=True)
    lines = [machine]
    cfgs = configs(args.d_model, args.d_expert, args.experts, args.layers, args.vocab)
    for arch in args.archs.split(","):
        lines += run_arch(arch, cfgs[arch], args)
    if args.out:
        append_json_lines(args.out, lines)
    return 0


if __name__ == "__main__":
    main()
