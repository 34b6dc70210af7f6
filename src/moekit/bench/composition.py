"""Composition of Experts (arXiv 2412.01868) over LoRA variants of one base, with bits per byte.

  experts   "base": the dense moekit model of benchmarks/open_knowledge.py (trained on all six domains),
            and six LoRA variants of it, one per domain ("python", "english", ...: the same library)
  build     the category router (hashed byte n-grams, logistic regression) trains on --per-category
            labelled train samples of each domain; each category maps to the expert with the lowest
            bits per byte on its first --mapping-per-category of those samples
  eval      every validation sample of the corpus is one request, in batches of --batch-size (each
            chosen expert runs once per batch); bits per byte per domain of the routed composition,
            of oracle routing (true domain -> its mapped expert) and of every single expert on every
            request; the router's accuracy

Which text is used for what: the base and the LoRAs trained on the train split; the router and the
mapping use train samples only (labelled by domain); every reported number comes from the validation
split (disjoint from train), which chose nothing.

The same with the command line:
    moekit compose build --expert base=runs/open-knowledge/base \\
        --expert python=runs/open-knowledge/base@runs/open-knowledge/library/python ... --out runs/coe
    moekit compose eval runs/coe

Prints one JSON line. Needs the base and library of benchmarks/open_knowledge.py (run it first).

    python benchmarks/composition.py [--work runs/open-knowledge]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

import moekit
from moekit.compose import ExpertSpec, build_composition, evaluate_composition
from moekit.compose.coe import corpus_examples
from moekit.data import DOMAINS


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="runs/open-knowledge", help="the base run and LoRA library of open_knowledge.py")
    p.add_argument("--per-category", type=int, default=64)
    p.add_argument("--mapping-per-category", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--per-domain", type=int, default=None, help="at most this many validation requests per domain")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    base = work / "base"
    experts = [ExpertSpec("base", str(base))]
    experts += [ExpertSpec(d, str(base), str(work / "library" / d)) for d in DOMAINS]
    missing = [e.adapter or e.run for e in experts if not Path(e.adapter or e.run).is_dir()]
    if missing:
        sys.exit(f"composition.py: {missing[0]} is missing; run benchmarks/open_knowledge.py first")
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    t0 = time.time()
    texts, categories = corpus_examples("train", args.per_category)
    comp = build_composition(experts, texts, categories, args.mapping_per_category, seq_len=args.seq_len,
                             seed=args.seed, log=log)
    build_s = time.time() - t0
    t0 = time.time()
    texts, categories = corpus_examples("validation", args.per_domain)
    result = evaluate_composition(comp, texts, categories, args.batch_size, args.seq_len)
    result.update(bench="composition", mapping_bpb=comp.mapping_bpb, build_seconds=round(build_s, 1),
                  eval_seconds=round(time.time() - t0, 1),
                  settings={k: v for k, v in vars(args).items() if k != "work"},
                  machine={"python": platform.python_version(), "torch": torch.__version__,
                           "moekit": moekit.__version__, "cpus": os.cpu_count(), "threads": torch.get_num_threads()})
    print(json.dumps(result), flush=True)
