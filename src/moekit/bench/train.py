"""Training throughput of the `tiny` preset against transformers' OlmoeForCausalLM of the same shape.

Implementations (each in its own worker process, so that each peak RSS is its own):
  moekit_tiny     `preset("tiny")`: top-p routing (p = 0.4), the preset's loss (LM + aux losses)
  moekit_topk     `preset("topk")`: top-2 of 8, softmax, renormalised; the like-for-like one
  hf_<impl>       transformers' OlmoeForCausalLM with the same d_model, layers, heads, experts,
                  expert width, k = 2 (norm_topk_prob), vocabulary (byte tokenizer: 259), tied
                  embeddings and batch, its load-balancing loss on (router_aux_loss_coef 0.01), per
                  experts implementation that runs here: eager and the entries of
                  `transformers.integrations.moe.ALL_EXPERTS_FUNCTIONS` (GPU-only ones fail their
                  trial step; batched_mm is skipped when its per-assignment weight copies exceed
                  --batched-mm-limit-gib)
One training step = forward + cross-entropy (+ aux losses) + backward + clip_grad_norm(1.0) +
AdamW step (lr 3e-3, betas (0.9, 0.95), weight decay 0.1 on matrices) + zero_grad, on the same
batches of the embedded corpus (`micro_batch` x `seq_len` tokens, the preset's 16 x 128). moekit's
step mirrors `moekit.train.train` (including its per-step metric reads and `after_optimizer_step`).
Architectures differ where OLMoE has its own parts (q/k RMSNorm, its router implementation).

Timing: the parent runs one step in each worker in turn (round-robin, only one worker busy at a
time), --repeats rounds after --warmup steps each; the figure is the median. `uptime`'s load
average is recorded before and after. Each worker uses --threads torch threads (default: torch's).

JSON lines: a machine line; one line per implementation (tokens_per_s, step_ms, peak_rss_mb =
that worker's ru_maxrss); a summary with
  ratio_hf       moekit_topk tokens/s / fastest transformers tokens/s  (like for like; > 1: moekit faster)
  ratio_hf_tiny  moekit_tiny tokens/s / fastest transformers tokens/s  (top-p has no transformers counterpart)
--profile IMPL prints torch.profiler's top operators for a few steps of one implementation.

Usage: moekit bench train [--quick] [--out docs/results/train-cpu.jsonl]   (or python benchmarks/train.py ...)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

from moekit.bench.timing import append_json_lines, load_average, peak_rss_mb, round_robin

MOEKIT_PRESETS = {"moekit_tiny": "tiny", "moekit_topk": "topk"}


# ----------------------------------------------------------------------------------------- worker side
def _param_groups(model, weight_decay: float) -> list[dict]:
    """moekit's trainer's groups: decay matrices only."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def _build(impl: str, args):
    """(model, one-step closure taking the (B, T+1) batch, info dict) for one implementation."""
    import torch
    import torch.nn.functional as F

    import moekit
    from moekit.models import MoELM
    from moekit.train.presets import preset

    model_cfg, train_cfg = preset("topk" if impl.startswith("hf_") else MOEKIT_PRESETS[impl])
    model_cfg = dataclasses.replace(model_cfg, vocab_size=259)  # the byte tokenizer, as train() sets it
    torch.manual_seed(0)
    if impl.startswith("hf_"):
        from transformers import OlmoeConfig, OlmoeForCausalLM
        from transformers.utils import logging

        logging.set_verbosity_error()
        moe = model_cfg.moe
        cfg = OlmoeConfig(vocab_size=model_cfg.vocab_size, hidden_size=model_cfg.d_model,
                          intermediate_size=moe.d_expert, num_hidden_layers=model_cfg.n_layers,
                          num_attention_heads=model_cfg.n_heads, num_key_value_heads=model_cfg.kv_heads,
                          max_position_embeddings=model_cfg.max_seq_len, rms_norm_eps=model_cfg.norm_eps,
                          tie_word_embeddings=model_cfg.tie_embeddings, num_experts=moe.num_experts,
                          num_experts_per_tok=round(moe.router.expected_experts_per_token(moe.num_experts)), norm_topk_prob=True, output_router_logits=True,
                          router_aux_loss_coef=train_cfg.load_balance_coef, use_cache=False, pad_token_id=0,
                          eos_token_id=None)
        model = OlmoeForCausalLM(cfg)
        model.set_experts_implementation(impl[3:])
        coef = cfg.router_aux_loss_coef

        def loss_of(ids_BT):
            out = model(input_ids=ids_BT[:, :-1], use_cache=False)
            lm = F.cross_entropy(out.logits.float().flatten(0, 1), ids_BT[:, 1:].flatten())
            return lm + coef * out.aux_loss, {"lm_loss": lm}
        after_step = None
        info = {"experts_implementation": model.config._experts_implementation}
    else:
        model = MoELM(model_cfg.validate())
        moekit.BalanceTracker(model)  # counts each step for after_optimizer_step, as the trainer's does
        coefs = train_cfg.aux_coefs

        def loss_of(ids_BT):
            lm = F.cross_entropy(model(ids_BT[:, :-1]).float().flatten(0, 1), ids_BT[:, 1:].flatten())
            aux = model.aux_losses()
            return lm + sum(coefs.get(n, 0.0) * v for n, v in aux.items()), {"lm_loss": lm, **aux}

        def after_step():
            for layer in model.moe_layers():  # the trainer reads these every step
                layer.routing_info().stats()
            moekit.after_optimizer_step(model)
        info = {"router": model_cfg.moe.router.describe()}
    model.train()
    opt = torch.optim.AdamW(_param_groups(model, train_cfg.weight_decay), lr=train_cfg.lr,
                            betas=(train_cfg.beta1, train_cfg.beta2))

    def step(ids_BT):
        loss, parts = loss_of(ids_BT)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if after_step is not None:
            after_step()
        return {k: float(v.detach()) for k, v in {"loss": loss, **parts}.items()}

    info["params"] = sum(p.numel() for p in model.parameters())
    return model, step, info


def _batches(args):
    import numpy as np

    from moekit.data import ByteTokenizer, encode_samples, load_corpus
    from moekit.train.trainer import TrainConfig, batch_at

    tokens, _ = encode_samples(load_corpus("train"), ByteTokenizer())
    cfg = TrainConfig(micro_batch=args.batch, seq_len=args.seq_len, seed=0)
    return [batch_at(np.asarray(tokens), s, 0, cfg) for s in range(args.warmup + args.repeats + 1)]


def worker(impl: str, args) -> None:
    """Serve the parent on stdin/stdout: 'step' runs one timed training step, 'quit' reports peak RSS."""
    import torch

    model, step, info = _build(impl, args)
    batches = _batches(args)
    n = 0
    for _ in range(args.warmup):
        step(batches[n % len(batches)])
        n += 1
    if impl == "moekit_tiny":
        info["experts_per_token"] = float(torch.tensor([layer.routing_info().stats()["experts_per_token_mean"]
                                                        for layer in model.moe_layers()]).mean())
    print(json.dumps({"ready": True, **info}), flush=True)
    for line in sys.stdin:
        if line.strip() == "step":
            t0 = time.perf_counter()
            metrics = step(batches[n % len(batches)])
            dt = time.perf_counter() - t0
            n += 1
            print(json.dumps({"s": dt, "loss": metrics["loss"]}), flush=True)
        else:
            print(json.dumps({"peak_rss_mb": round(peak_rss_mb(), 1)}), flush=True)
            return


def profile(impl: str, args) -> None:
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    _, step, _ = _build(impl, args)
    batches = _batches(args)
    for b in batches[:args.warmup]:
        step(b)
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for b in batches[args.warmup:args.warmup + 3]:
            step(b)
    events = prof.key_averages()
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.profile_rows))

    def total(key_part: str, self_time: bool = True) -> float:
        return sum((e.self_cpu_time_total if self_time else e.cpu_time_total) for e in events
                   if key_part in e.key) / 1e6 / 3

    per_step = sum(e.self_cpu_time_total for e in events) / 1e6 / 3
    print(json.dumps({"bench": "train_profile", "impl": impl, "threads": torch.get_num_threads(),
                      "cpu_s_per_step": round(per_step, 3), "mm_s": round(total("aten::mm"), 3),
                      "grouped_mm_incl_s": round(total("aten::_grouped_mm", self_time=False), 3),
                      "attention_s": round(total("scaled_dot_product"), 3),
                      "optimizer_s": round(total("Optimizer.step", self_time=False), 3)}))


# ----------------------------------------------------------------------------------------- parent side
def _spawn(impl: str, argv: list[str]) -> subprocess.Popen:
    err = tempfile.TemporaryFile("w+")  # not a pipe: one nobody reads could fill up and stall the worker
    proc = subprocess.Popen([sys.executable, "-m", "moekit.bench.train", "--worker", impl, *argv],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True, bufsize=1)
    proc.err_file = err
    return proc


def _ask(proc: subprocess.Popen, msg: str | None = None) -> dict:
    if msg is not None:
        proc.stdin.write(msg + "\n")
        proc.stdin.flush()
    line = proc.stdout.readline()
    if not line:
        code = proc.wait()
        proc.err_file.seek(0)
        err = [t for t in proc.err_file.read().splitlines() if t.strip()]
        raise RuntimeError(f"worker exited with code {code}: {err[-1] if err else ''}")
    return json.loads(line)


def hf_impls() -> list[str]:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    return ["eager", *ALL_EXPERTS_FUNCTIONS.keys()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a short run: batch 4, 2 warm-up steps, 3 rounds")
    p.add_argument("--batch", type=int, default=16, help="sequences per step (the tiny preset's micro_batch)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (the tiny preset's seq_len)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=7, help="timed rounds (one step of each implementation per round)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per worker (0: torch's default)")
    p.add_argument("--impls", default=None, help="comma-separated subset, e.g. moekit_topk,hf_grouped_mm")
    p.add_argument("--batched-mm-limit-gib", type=float, default=2.0,
                   help="skip transformers' batched_mm when its weight copies for one step exceed this")
    p.add_argument("--profile", metavar="IMPL", help="profile IMPL (torch.profiler, 3 steps) instead of timing")
    p.add_argument("--profile-rows", type=int, default=25)
    p.add_argument("--worker", metavar="IMPL", help=argparse.SUPPRESS)
    p.add_argument("--out", help="also append the JSON lines to this file")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.warmup, args.repeats = 4, 2, 3
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.worker:
        worker(args.worker, args)
        return 0
    if args.profile:
        profile(args.profile, args)
        return 0

    import torch
    from transformers import __version__ as transformers_version

    import moekit
    from moekit.train.presets import preset

    passed = ["--batch", str(args.batch), "--seq-len", str(args.seq_len), "--warmup", str(args.warmup),
              "--repeats", str(args.repeats), "--threads", str(args.threads)]
    candidates = [*MOEKIT_PRESETS, *(f"hf_{i}" for i in hf_impls())]
    impls = args.impls.split(",") if args.impls else candidates
    skipped: dict[str, str] = {}
    if "hf_batched_mm" in impls:
        # batched_mm gathers one copy of an expert's three matrices per assignment, kept for backward
        model_cfg, _ = preset("topk")
        moe = model_cfg.moe
        gib = (args.batch * args.seq_len * moe.router.expected_experts_per_token(moe.num_experts) * 3 * moe.d_model * moe.d_expert * 4
               * model_cfg.n_layers / 2**30)
        if gib > args.batched_mm_limit_gib:
            skipped["hf_batched_mm"] = f"would gather {gib:.1f} GiB of expert weights per step"
            impls.remove("hf_batched_mm")

    machine = {"bench": "machine", "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
               "threads": torch.get_num_threads(), "torch": torch.__version__, "transformers": transformers_version,
               "moekit": moekit.__version__, "quick": args.quick}
    lines = [machine]
    print(json.dumps(machine), flush=True)
    load_before = load_average()
    workers, ready = {}, {}
    for impl in impls:  # start one at a time: building overlaps with nothing being timed
        proc = _spawn(impl, passed)
        try:
            ready[impl] = _ask(proc)
            workers[impl] = proc
        except (RuntimeError, json.JSONDecodeError) as e:  # GPU-only experts implementations fail here
            skipped[impl] = str(e)[:160]
            proc.kill()
    # each worker has run its warm-up steps and times its own step (no pipe round trip in the figure)
    secs = round_robin({impl: lambda proc=proc: float(_ask(proc, "step")["s"]) for impl, proc in workers.items()},
                       args.repeats, warmup=0)
    peak = {impl: _ask(proc, "quit")["peak_rss_mb"] for impl, proc in workers.items()}
    for proc in workers.values():
        proc.wait()
    load_after = load_average()

    tokens = args.batch * args.seq_len
    tps = {}
    for impl in workers:
        med = statistics.median(secs[impl])
        tps[impl] = tokens / med
        res = {"bench": "train", "impl": impl, "batch": args.batch, "seq_len": args.seq_len, "tokens_per_step": tokens,
               "tokens_per_s": round(tps[impl], 1), "step_ms": round(1e3 * med, 1),
               "step_ms_min": round(1e3 * min(secs[impl]), 1), "repeats": args.repeats,
               "peak_rss_mb": peak[impl], **{k: v for k, v in ready[impl].items() if k != "ready"}}
        lines.append(res)
        print(json.dumps(res), flush=True)
    hf = {impl: t for impl, t in tps.items() if impl.startswith("hf_")}
    summary = {"bench": "train_summary", "tokens_per_step": tokens, "skipped": skipped,
               "load_before": load_before, "load_after": load_after}
    if hf:
        best = max(hf, key=hf.get)
        summary.update(hf_best_impl=best[3:], tokens_per_s_hf_best=round(hf[best], 1))
        for name, impl in (("ratio_hf", "moekit_topk"), ("ratio_hf_tiny", "moekit_tiny")):
            if impl in tps:
                summary[name] = round(tps[impl] / hf[best], 3)
    lines.append(summary)
    print(json.dumps(summary), flush=True)
    if args.out:
        append_json_lines(args.out, lines)
    return 0


if __name__ == "__main__":
    main()
