"""Cross-rank bytes a placement saves, on routing traces (moekit.dispatch.placement.placement_report).

Traces (the executed experts of the validation samples, as `moekit analyze` records them):
  run   a moekit run directory (--run; e.g. `moekit train --preset tiny --train.steps 20 --out RUN`)
  hf    a tiny transformers Mixtral (4 layers, 8 experts, top-2, d_model 64, random weights) wrapped
        by moekit.hf.wrap
For EP sizes 2 and 4, the all-to-all bytes per token (bf16 rows) of: the current contiguous placement
(fixed homes, moekit's data-parallel layout), the same with tokens following their experts, ExFlow's
affinity placement (tokens following their experts), speculative token shuffling (homes chosen from
the experts the router will pick: the executed ones = oracle, and the one-layer-ahead gate prediction
recorded in the trace = what a speculative system can know), and affinity + shuffling. JSON lines.

Usage: python benchmarks/ep_placement.py --run RUN [--samples 8] [--out docs/results/ep-placement.jsonl]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from moekit.analysis.trace import corpus_batches, record_trace  # noqa: E402
from moekit.bench.timing import write_json_lines
from moekit.data import DOMAINS, ByteTokenizer, load_corpus  # noqa: E402
from moekit.dispatch.placement import placement_report  # noqa: E402


def _samples(n: int):
    return [s for d in DOMAINS for s in load_corpus("validation", d)[:n]]


def run_trace(run: str, n: int, seq_len: int):
    from moekit.train import load_trained

    model, _, tokenizer = load_trained(run)
    return record_trace(model, corpus_batches(_samples(n), tokenizer, seq_len, 8)), model.cfg.d_model


def hf_trace(n: int, seq_len: int):
    from transformers import AutoModelForCausalLM, MixtralConfig

    import moekit.hf

    cfg = MixtralConfig(vocab_size=259, hidden_size=64, intermediate_size=64, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
                        max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(cfg).eval()
    moekit.hf.wrap(hf)
    trace = record_trace(hf, corpus_batches(_samples(n), ByteTokenizer(), seq_len, 8),
                         forward=lambda ids, mask: hf(input_ids=ids, attention_mask=mask))
    return trace, cfg.hidden_size


def predicted(trace, d: int = 1) -> np.ndarray | None:
    """The gate's one-layer-ahead prediction stacked like `trace.stacked()` (layers without one: -1)."""
    if not trace.prefetch or d not in trace.prefetch:
        return None
    K = max(p.shape[2] for p in trace.prefetch[d])
    return np.concatenate([np.pad(p, ((0, 0), (0, 0), (0, K - p.shape[2])), constant_values=-1)
                           for p in trace.prefetch[d]], axis=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, help="a moekit run directory")
    parser.add_argument("--samples", type=int, default=8, help="validation samples per domain (default 8)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    lines = []
    for name, (trace, d_model) in (("run", run_trace(args.run, args.samples, args.seq_len)),
                                   ("hf_mixtral_tiny", hf_trace(args.samples, args.seq_len))):
        experts_LTK = trace.stacked()
        for W in (2, 4):
            rows = {"gate_prediction": predicted(trace), "oracle": None}
            for source, pred in rows.items():
                report = placement_report(experts_LTK, trace.num_experts, W, d_model, itemsize=2, predicted_LTK=pred)
                report.pop("affinity_rank_LE")
                lines.append({"trace": name, "shuffle_source": source, **report,
                              "bytes_per_token": {k: round(v, 1) for k, v in report["bytes_per_token"].items()},
                              "saved_fraction": {k: round(v, 4) for k, v in report["saved_fraction"].items()},
                              "colocated_pairs": {k: round(v, 4) for k, v in report["colocated_pairs"].items()}})
    write_json_lines(lines, args.out)
    return 0
