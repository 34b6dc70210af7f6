"""MoLAE conversion (arXiv 2503.23100) of a trained moekit run: per rank, the reconstruction error of
each MoE layer's stacked expert matrices, the validation bits-per-byte change and the bytes saved.

Prints one JSON line per rank: {"rank", "input_error_L", "output_error_L", "bpb", "bpb_delta",
"expert_bytes_before", "expert_bytes_after", "dense_bytes_added", "bytes_saved"} (bytes summed over layers).

    python benchmarks/molae.py RUN [--ranks 128,96,64,32] [--eval-tokens 4096]
"""

from __future__ import annotations

import argparse
import json

from moekit.layers.latent import molae_model
from moekit.train.evaluate import evaluate
from moekit.train.trainer import load_trained


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("--ranks", default="128,96,64,32")
    ap.add_argument("--eval-tokens", type=int, default=4096)
    args = ap.parse_args(argv)
    model, train_cfg, tokenizer = load_trained(args.run)
    model.eval()
    base = evaluate(model, tokenizer, seq_len=train_cfg.seq_len, max_tokens_per_domain=args.eval_tokens)["bpb"]
    print(json.dumps({"rank": None, "bpb": base}), flush=True)
    for rank in (int(r) for r in args.ranks.split(",")):
        new, reports = molae_model(model, rank)
        bpb = evaluate(new, tokenizer, seq_len=train_cfg.seq_len, max_tokens_per_domain=args.eval_tokens)["bpb"]
        row = {"rank": rank, "input_error_L": [r["input_error"] for r in reports],
               "output_error_L": [r["output_error"] for r in reports], "bpb": bpb, "bpb_delta": bpb - base}
        for key in ("expert_bytes_before", "expert_bytes_after", "dense_bytes_added", "bytes_saved"):
            row[key] = sum(r[key] for r in reports)
        print(json.dumps(row), flush=True)
