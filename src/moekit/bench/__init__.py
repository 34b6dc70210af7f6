"""moekit's benchmarks, one module each with `main(argv) -> int` printing JSON lines; run them with
`moekit bench NAME [ARGS]` (from an installed moekit too) or `python benchmarks/NAME.py [ARGS]` in a
source checkout. Every one times its competing implementations with `moekit.bench.timing` (round-robin,
peak memory, load average). Results and their reading: docs/benchmarks.md.

Importing this package imports nothing else (no torch), so `moekit bench --help` lists them at once.
"""

from __future__ import annotations

import importlib

# name -> what it measures (`moekit bench --help`)
BENCHMARKS = {
    "layer": "one MoE layer against a dense FFN of the same active FLOPs and transformers' OLMoE block",
    "hf": "whole transformers MoE models wrapped by moekit against transformers itself (prefill, decode)",
    "analysis": "`moekit analyze` on a 1M-row synthetic trace, and the cost of recording a trace",
    "offload": "offloaded generation: expert budgets x cache policies against fully resident decoding",
    "train": "training throughput of the tiny preset against transformers' OlmoeForCausalLM",
    "architectures": "offloaded decoding of each `moekit compare` run: hit rate, bytes moved and tokens/s at an expert budget",
    "molae": "MoLAE conversion of a trained run: reconstruction, bits-per-byte delta and bytes saved per rank",
    "composition": "Composition of Experts: routed vs oracle vs single models, bits per byte and router accuracy",
    "open_knowledge": "LoRA library per domain, K-shot selection, MoE of selected LoRAs vs base, singles and merges",
    "ep": "expert parallelism over gloo: step time, all-to-all bytes and time per EP size, bytes vs the lower bound",
    "ep_placement": "cross-rank bytes per token of placements (current, ExFlow affinity, speculative shuffling) on traces",
    "compress": "compression on trained presets: bits per byte, expert bytes and offloaded decoding per method",
}


def run(name: str, argv: list[str]) -> int:
    """Run benchmark `name` with command-line arguments `argv`; its exit code."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; allowed: {', '.join(BENCHMARKS)}")
    return importlib.import_module(f"moekit.bench.{name}").main(argv) or 0
