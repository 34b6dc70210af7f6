"""`moekit analyze RUN | --hf DIR | TRACE --out DIR`: metrics.json and report.html.

RUN (a moekit run directory) and --hf DIR (a local transformers checkpoint, wrapped) are first run
over the embedded corpus's validation split while a `TraceRecorder` records their routing; the
trace is saved as OUT/trace.npz next to the report. TRACE is an existing trace file (copied there).
The three files are written as one set or not at all (moekit.analysis.report.analyze); OUT is
checked (absent, empty or an earlier report) before any recording starts. Errors are raised;
moekit.cli prints them as one line.
"""

from __future__ import annotations

import argparse

from moekit.cli.common import add_route_argument, positive_int

__all__ = ["add_arguments", "add_parser", "run"]


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from e
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, got {text!r}")
    return values




def add_parser(subparsers) -> None:
    add_arguments(subparsers.add_parser("analyze", help="routing metrics and an HTML report (RUN, --hf DIR or a "
                                        "trace file)"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of `moekit analyze`."""
    parser.add_argument("source", nargs="?", help="a moekit run directory or a routing-trace file (docs/trace-format.md)")
    parser.add_argument("--hf", metavar="DIR", help="a local transformers checkpoint directory instead of SOURCE")
    add_route_argument(parser)
    parser.add_argument("--seq-len", type=positive_int, default=256,
                        help="tokens per validation sample when recording (default 256)")
    parser.add_argument("--samples-per-domain", type=positive_int, default=32,
                        help="validation samples per domain when recording (default 32)")
    parser.add_argument("--out", required=True,
                        help="output directory for report.html, metrics.json and trace.npz (absent, empty or an "
                             "earlier report)")
    parser.add_argument("--workers", type=positive_int, default=2, help="processes for the simulations (default 2)")
    parser.add_argument("--srp-n", type=_ints, default=(4, 16, 64, 256), help="SRP segment lengths (default 4,16,64,256)")
    parser.add_argument("--sch-n", type=_ints, default=(4, 16, 64), help="SCH segment lengths, per-layer caches")
    parser.add_argument("--model-sch-n", type=_ints, default=(16,), help="SCH segment lengths, whole-model cache")
    parser.add_argument("--max-multiple", type=positive_int, default=8, help="per-layer caches: C from k to this times k")
    parser.add_argument("--model-multiples", type=_ints, default=(1, 2, 4, 8),
                        help="whole-model cache: C = L x multiple x k (default 1,2,4,8)")
    parser.add_argument("--boot", type=positive_int, default=200, help="bootstrap replicates for SRP intervals")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap and the simulations (default 0)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from moekit.analysis.report import AnalysisConfig, analyze, check_report_dir

    cfg = AnalysisConfig(srp_n=args.srp_n, n_boot=args.boot, sch_n=args.sch_n, model_sch_n=args.model_sch_n,
                         max_multiple=args.max_multiple, model_multiples=args.model_multiples,
                         workers=args.workers, seed=args.seed).validate()
    check_report_dir(args.out)  # before minutes of recording
    trace = _trace_source(args)
    m = analyze(trace, args.out, cfg, progress=not args.no_progress)
    t = m["trace"]
    print(f"moekit analyze: {t['num_sequences']} sequences, {t['num_rows']} (token, layer) rows, "
          f"L={t['num_layers']} E={t['num_experts']} k={t['mean_experts_per_token']:.2f}; "
          f"wrote {args.out}/report.html, metrics.json and trace.npz")
    return 0


def _trace_source(args: argparse.Namespace):
    """A trace path, or a trace recorded now from a run directory or a transformers checkpoint."""
    from pathlib import Path

    from moekit.errors import UsageError

    if (args.source is None) == (args.hf is None):
        raise UsageError("give exactly one of SOURCE (run directory or trace file) and --hf DIR")
    if args.source is not None and not Path(args.source).is_dir():
        if args.route:
            raise UsageError(f"--route re-routes a model before its routing is recorded; {args.source} is a trace "
                             "file, recorded already; expected a run directory or --hf DIR with --route")
        return args.source
    import torch

    from moekit.analysis.trace import corpus_batches, record_trace
    from moekit.cli.common import apply_route, check_route
    from moekit.data import DOMAINS, load_corpus

    check_route(args.route)  # before minutes of loading
    if args.hf is not None:
        from moekit.cli.common import load_hf_dir
        from moekit.hf.adapters import HFCausalLM, tokenizer_for

        hf_model, tok = load_hf_dir(args.hf)
        model = HFCausalLM(hf_model)
        tokenizer = tokenizer_for(tok, hf_model.config.vocab_size)
        label = {"source": "hf", "path": str(args.hf)}
    else:
        from moekit.train import load_trained

        model, _, tokenizer = load_trained(args.source)
        label = {"source": "run", "path": str(args.source)}
    handles = apply_route(model, args.route)  # kept while the trace is recorded
    if handles:
        label["route"] = [spec.text for spec in args.route]
    samples = [s for d in DOMAINS for s in load_corpus("validation", d)[: args.samples_per_domain]]
    seq_len = min(args.seq_len, getattr(getattr(model, "cfg", None), "max_seq_len", args.seq_len))
    with torch.no_grad():
        return record_trace(model, corpus_batches(samples, tokenizer, seq_len, 8),
                            forward=lambda ids, mask: model(ids, mask) if args.hf else model(ids),
                            meta=label, progress=not args.no_progress, token_loss=True)
