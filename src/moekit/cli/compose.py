"""`moekit compose build | eval | serve`: a Composition of Experts from the command line.

  build --expert NAME=RUN[@ADAPTER] ... --out DIR
        train the category router on labelled examples (default: the embedded corpus's train split,
        --per-category samples of each domain, labelled by domain; or --examples FILE, JSON lines
        {"text": ..., "category": ...}) and map each category to its best expert on the first
        --mapping-per-category examples; writes DIR (compose.json + router.safetensors)
  eval DIR
        bits per byte per category of the routed composition, oracle routing and every single
        expert, and the router's accuracy (default requests: the corpus's validation split, one
        request per sample; or --requests FILE, JSON lines as above)
  serve DIR
        read requests from stdin, one per line; every --batch-size lines (and at the end of input) the
        batch is routed, each chosen expert runs once on its group, and one JSON line per request is
        written: {"category", "expert", "confidence", "text"} (greedy continuation), or with --score
        {"category", "expert", "confidence", "bpb"}. No network is involved.

Registered in moekit.cli.COMMANDS.
"""

from __future__ import annotations

import argparse
import json
import sys

from moekit.cli.common import positive_int

__all__ = ["add_parser", "run"]




def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {value}")
    return value


def _expert(text: str):
    from moekit.compose.coe import ExpertSpec

    name, sep, rest = text.partition("=")
    if not sep or not name or not rest:
        raise argparse.ArgumentTypeError(f"expected NAME=RUN or NAME=RUN@ADAPTER, got {text!r}")
    run, _, adapter = rest.partition("@")
    return ExpertSpec(name, run, adapter or None)


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add `compose` (with build, eval and serve) to the top-level `subparsers`; returns its parser."""
    parser = subparsers.add_parser("compose", help="Composition of Experts: build, evaluate, serve")
    parser.set_defaults(func=run)
    sub = parser.add_subparsers(dest="compose_command", required=True)
    b = sub.add_parser("build", help="train the category router and map categories to experts")
    b.add_argument("--expert", type=_expert, action="append", required=True, metavar="NAME=RUN[@ADAPTER]",
                   help="an expert: a moekit run directory, optionally with an adapter directory on top (repeat)")
    b.add_argument("--out", required=True, help="output directory (absent, empty or an earlier composition)")
    b.add_argument("--examples", metavar="FILE", help="labelled examples, JSON lines {\"text\", \"category\"} "
                   "(default: the embedded corpus's train split, labelled by domain)")
    b.add_argument("--per-category", type=positive_int, default=64,
                   help="corpus samples per domain for the router (default 64)")
    b.add_argument("--mapping-per-category", type=positive_int, default=8,
                   help="examples per category on which the experts are compared (default 8)")
    b.add_argument("--fallback", metavar="NAME", help="expert for requests the router is unsure of")
    b.add_argument("--min-confidence", type=_probability, default=0.0,
                   help="with --fallback: route to it when the top category probability is lower (default 0)")
    b.add_argument("--seq-len", type=positive_int, default=128, help="scoring window length (default 128)")
    b.add_argument("--seed", type=int, default=0)
    e = sub.add_parser("eval", help="bits per byte of routed, oracle and single-expert runs; router accuracy")
    e.add_argument("dir", help="a composition directory (the --out of build)")
    e.add_argument("--requests", metavar="FILE", help="JSON lines {\"text\", \"category\"} (default: the embedded "
                   "corpus's validation split)")
    e.add_argument("--per-category", type=positive_int, default=None, help="at most this many requests per category")
    e.add_argument("--batch-size", type=positive_int, default=16, help="requests per batch (default 16)")
    e.add_argument("--seq-len", type=positive_int, default=128, help="scoring window length (default 128)")
    e.add_argument("--json", action="store_true", help="print the full JSON result")
    s = sub.add_parser("serve", help="route requests read from stdin (one per line) and write one JSON line each")
    s.add_argument("dir", help="a composition directory (the --out of build)")
    s.add_argument("--batch-size", type=positive_int, default=8, help="requests per batch (default 8)")
    s.add_argument("--max-new-tokens", type=positive_int, default=64, help="greedy continuation length (default 64)")
    s.add_argument("--score", action="store_true", help="write each request's bits per byte instead of a continuation")
    return parser


def _read_jsonl(path: str) -> tuple[list[str], list[str]]:
    from moekit.errors import DataError

    texts, categories = [], []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                texts.append(str(row["text"]))
                categories.append(str(row["category"]))
            except (ValueError, KeyError, TypeError):
                raise DataError(f"{path} line {i}: expected a JSON object with \"text\" and \"category\"") from None
    if not texts:
        raise DataError(f"{path} holds no examples")
    return texts, categories


def _build(args) -> int:
    from moekit.compose.coe import build_composition, corpus_examples
    from moekit.errors import UsageError
    from moekit.utils.io import check_writable_dir

    check_writable_dir(args.out, "compose", "moekit compose build")  # before anything is trained
    names = [e.name for e in args.expert]
    if args.fallback is not None and args.fallback not in names:
        raise UsageError(f"--fallback {args.fallback!r} is not one of the --expert names {names}")
    texts, categories = _read_jsonl(args.examples) if args.examples else corpus_examples("train", args.per_category)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    comp = build_composition(args.expert, texts, categories, args.mapping_per_category, seq_len=args.seq_len,
                             fallback=args.fallback, min_confidence=args.min_confidence, seed=args.seed, log=log)
    comp.save(args.out)
    print(f"moekit compose: wrote {args.out} ({len(names)} experts, {len(comp.categories)} categories); "
          f"category -> expert: " + ", ".join(f"{c} -> {e}" for c, e in comp.mapping.items()))
    return 0


def _table(result: dict) -> str:
    experts = [s for s in result["overall"] if s not in ("routed", "oracle")]
    head = f"{'category':<10} {'router acc':>10} {'routed':>8} {'oracle':>8} " + " ".join(f"{e:>10}" for e in experts)
    lines = [head]
    for c, row in result["per_category"].items():
        lines.append(f"{c:<10} {row['router_accuracy']:>10.3f} {row['routed']:>8.4f} {row['oracle']:>8.4f} "
                     + " ".join(f"{row[e]:>10.4f}" for e in experts))
    o = result["overall"]
    lines.append(f"{'all':<10} {result['router_accuracy']:>10.3f} {o['routed']:>8.4f} {o['oracle']:>8.4f} "
                 + " ".join(f"{o[e]:>10.4f}" for e in experts))
    lines.append(f"bits per byte over {result['requests']} requests; category -> expert: "
                 + ", ".join(f"{c} -> {e}" for c, e in result["mapping"].items()))
    return "\n".join(lines)


def _eval(args) -> int:
    from moekit.compose.coe import Composition, corpus_examples, evaluate_composition

    comp = Composition.load(args.dir)
    if args.requests:
        texts, categories = _read_jsonl(args.requests)
        if args.per_category is not None:
            kept = [i for i, c in enumerate(categories) if categories[:i].count(c) < args.per_category]
            texts, categories = [texts[i] for i in kept], [categories[i] for i in kept]
    else:
        texts, categories = corpus_examples("validation", args.per_category)
    result = evaluate_composition(comp, texts, categories, args.batch_size, args.seq_len)
    print(json.dumps(result, indent=2) if args.json else _table(result))
    return 0


def _serve(args, stdin=None, stdout=None) -> int:
    from moekit.compose.coe import Composition, bits_per_byte

    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    comp = Composition.load(args.dir)

    def flush(batch: list[str]) -> None:
        routes = comp.route(batch)
        if args.score:
            results = [{"bpb": round(bits_per_byte([s]), 4)} for s in comp.score(batch, routes)]
        else:
            results = [{"text": t} for t in comp.generate(batch, routes, args.max_new_tokens)]
        for route, result in zip(routes, results, strict=True):
            row = {"category": route.category, "expert": route.expert, "confidence": round(route.confidence, 4)}
            stdout.write(json.dumps({**row, **result}, ensure_ascii=False) + "\n")
        stdout.flush()

    batch: list[str] = []
    for line in stdin:
        batch.append(line.rstrip("\r\n"))
        if len(batch) == args.batch_size:
            flush(batch)
            batch = []
    if batch:
        flush(batch)
    return 0


def run(args) -> int:
    return {"build": _build, "eval": _eval, "serve": _serve}[args.compose_command](args)
