"""Offloaded decoding of the runs of `moekit compare` (docs/results/architectures.md): one JSON line per
(run, policy) with the hit rate, expert bytes moved per token and decode tokens/s at an expert budget.

For every run directory COMPARE/NAME: 3 validation prompts (one each of python, english, german; the
first 48 tokens of each in the run's own tokenizer, byte or BPE), 48 sampled tokens (temperature 1, seed 0, the same for every run), expert store in a
temporary directory, policies lru and predictive (the next layer's router applied to this layer's
input: gate look-ahead on a normal model, exact for a pre-gated one). Prefetch recall is the share
of the experts a decode step ran at layers >= 1 that the prediction for that step named.

Then one "routing" line per run: the Chain-of-Experts intra-layer re-use per layer (a trace of 4
validation samples per domain, 128 tokens each; None without iterations) and the zero-computation
picks per token by layer and domain (`evaluate`, 1024 validation tokens per domain).

    python benchmarks/architectures.py COMPARE_DIR [--budget 25%] [--runs topk,pregated]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from moekit.data import load_corpus
from moekit.offload.generate import decode_loop, run_metrics
from moekit.offload.load import open_model_and_store
from moekit.offload.runtime import offload
from moekit.offload.store import ExpertStore
from moekit.train.trainer import load_run_config, make_tokenizer


def prefetch_recall(predictions, trace) -> float | None:
    """Share of executed (decode forward, layer >= 1, expert) triples that were predicted."""
    predicted = {(f, layer): set(order) for f, layer, order in predictions}
    hit = total = 0
    for f in range(1, len(trace.seqs)):
        for layer in range(1, trace.num_layers):
            ran = set(trace.seqs[f][layer][trace.seqs[f][layer] >= 0].tolist())
            total += len(ran)
            hit += len(ran & predicted.get((f, layer), set()))
    return hit / total if total else None


def run_prompts(tokenizer_name: str, n_tokens: int = 48) -> list[list[int]]:
    """The benchmark's prompts in a run's tokenizer ("byte" or "bpe"): the first `n_tokens` token ids
    of the first validation sample of python, english and german. A BPE run fed byte ids would decode
    from meaningless input, so the tokenizer is always the run's."""
    tok = make_tokenizer(tokenizer_name)
    return [tok.encode(load_corpus("validation", d)[0].text)[:n_tokens] for d in ("python", "english", "german")]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("compare_dir")
    ap.add_argument("--budget", default="25%")
    ap.add_argument("--runs", default=None, help="comma-separated run names (default: every run)")
    ap.add_argument("--tokens", type=int, default=48)
    args = ap.parse_args(argv)
    root = Path(args.compare_dir)
    names = args.runs.split(",") if args.runs else sorted(p.name for p in root.iterdir() if (p / "config.json").is_file())
    for name in names:
        prompts = run_prompts(load_run_config(root / name)[1].tokenizer)
        for policy in ("lru", "predictive"):
            rows = []
            for i, prompt in enumerate(prompts):
                with tempfile.TemporaryDirectory() as tmp:
                    model, store_path, _ = open_model_and_store(root / name, Path(tmp) / "store", None)
                    with ExpertStore(store_path) as store, offload(model, store, args.budget, policy,
                                                                   release=True) as rt:
                        torch.manual_seed(0)
                        _, timing, trace = decode_loop(model, torch.tensor([prompt]), args.tokens, temperature=1.0,
                                                       seed=i, runtime=rt)
                        m = run_metrics(rt, timing, trace, simulate=False)
                        m["recall"] = prefetch_recall(rt.predictions, trace) if policy == "predictive" else None
                        rows.append(m)

            def mean(key, rows=rows):
                vals = [r[key] for r in rows if r[key] is not None]
                return sum(vals) / len(vals) if vals else None

            print(json.dumps({"run": name, "policy": policy, "budget": args.budget,
                              "hit_rate": mean("hit_rate"), "bytes_moved_per_token": mean("bytes_moved_per_token"),
                              "decode_tokens_per_s": mean("decode_tokens_per_s"), "prefetch_recall": mean("recall"),
                              "dense_bytes": rows[0]["dense_bytes"], "total_expert_bytes": rows[0]["total_expert_bytes"],
                              "capacity_experts": rows[0]["capacity_experts"]}), flush=True)
        print(json.dumps(routing_line(root / name)), flush=True)


def routing_line(run_dir: Path) -> dict:
    from moekit.analysis.metrics import intra_layer_reuse
    from moekit.analysis.trace import corpus_batches, record_trace
    from moekit.data import DOMAINS
    from moekit.train.evaluate import evaluate
    from moekit.train.trainer import load_trained

    model, cfg, tokenizer = load_trained(run_dir)
    samples = [s for d in DOMAINS for s in load_corpus("validation", d)[:4]]
    trace = record_trace(model, corpus_batches(samples, tokenizer, seq_len=128, batch_size=8), gate_lookahead=0)
    reuse = intra_layer_reuse(trace)
    res = evaluate(model, tokenizer, seq_len=cfg.seq_len, max_tokens_per_domain=1024)
    return {"run": run_dir.name, "intra_layer_reuse": None if reuse is None else [round(float(x), 4) for x in reuse],
            "zero_compute_per_token_by_domain": {d: v["zero_compute_per_token_by_layer"]
                                                 for d, v in res["per_domain"].items()}}
