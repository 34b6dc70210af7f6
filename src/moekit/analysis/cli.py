"""`moekit analyze TRACE --out DIR`: metrics.json and report.html from a routing-trace file.

The top-level CLI wires it up with:

    a = sub.add_parser("analyze", help="routing metrics and an HTML report from a trace")
    moekit.analysis.cli.add_arguments(a)
    a.set_defaults(func=moekit.analysis.cli.run)
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["add_arguments", "run"]


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from e
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, got {text!r}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("trace", help="routing-trace file (docs/trace-format.md), e.g. written by TraceRecorder.save")
    parser.add_argument("--out", required=True, help="output directory for report.html and metrics.json")
    parser.add_argument("--workers", type=int, default=2, help="processes for the simulations (default 2)")
    parser.add_argument("--srp-n", type=_ints, default=(4, 16, 64, 256), help="SRP segment lengths (default 4,16,64,256)")
    parser.add_argument("--sch-n", type=_ints, default=(4, 16, 64), help="SCH segment lengths, per-layer caches")
    parser.add_argument("--model-sch-n", type=_ints, default=(16,), help="SCH segment lengths, whole-model cache")
    parser.add_argument("--max-multiple", type=int, default=8, help="per-layer caches: C from k to this times k")
    parser.add_argument("--model-multiples", type=_ints, default=(1, 2, 4, 8),
                        help="whole-model cache: C = L x multiple x k (default 1,2,4,8)")
    parser.add_argument("--boot", type=int, default=200, help="bootstrap replicates for SRP intervals")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from moekit.analysis.report import AnalysisConfig, analyze
    from moekit.analysis.tracefile import TraceFormatError

    cfg = AnalysisConfig(srp_n=args.srp_n, n_boot=args.boot, sch_n=args.sch_n, model_sch_n=args.model_sch_n,
                         max_multiple=args.max_multiple, model_multiples=args.model_multiples,
                         workers=args.workers, seed=args.seed)
    try:
        cfg.validate()
        m = analyze(args.trace, args.out, cfg, progress=not args.no_progress)
    except (FileNotFoundError, TraceFormatError, ValueError) as e:
        print(f"moekit analyze: {e}", file=sys.stderr)
        return 2
    t = m["trace"]
    print(f"moekit analyze: {t['num_sequences']} sequences, {t['num_rows']} (token, layer) rows, "
          f"L={t['num_layers']} E={t['num_experts']} k={t['mean_experts_per_token']:.2f}; "
          f"wrote {args.out}/report.html and {args.out}/metrics.json")
    return 0
