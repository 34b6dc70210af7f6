#!/usr/bin/env python3
"""Regenerate the golden loss curve the default test suite checks (tests/train/test_golden.py).

    PYTHONPATH=src python scripts/make_golden.py           # rewrite tests/train/golden_tiny_20.json
    PYTHONPATH=src python scripts/make_golden.py --check   # compare only, as the test does (exit 1 on a mismatch)

The recipe: 20 optimiser steps of the `tiny` preset (top-p routing) with `micro_batch` 4 and
`seq_len` 64 and one CPU thread (a fixed summation order), the preset's training recipe otherwise.
Every step's loss, lm_loss, grad_norm and experts per token are recorded.

Regenerate (and commit the file in the same change) whenever a change is *meant* to move training
numbers: a routing rule, a loss, an initialisation, the data order. A change that moves them by
accident fails the test.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

import torch

GOLDEN = Path(__file__).resolve().parents[1] / "tests" / "train" / "golden_tiny_20.json"
RECIPE = {"preset": "tiny",
          "train": {"steps": 20, "micro_batch": 4, "seq_len": 64, "threads": 1, "eval_tokens": 256,
                    "checkpoint_every": 1000}}
# NOTE: relative tolerance per recorded value. Measured spread of this recipe when only the
# floating-point summation order changes (ATEN_CPU_CAPABILITY=default, MKL_CBWR=COMPATIBLE, 2
# threads instead of 1; MKL_ENABLE_INSTRUCTIONS=AVX/SSE4_2 changed nothing): at most 2.4e-7 on
# loss and lm_loss (they are stored to 6 decimals), 6.5e-7 on grad_norm, 0 on experts per token.
# The tolerances sit ~400x above that and below what a changed rule moves (measured: 10% more
# balance-loss coefficient puts 49 values out of tolerance, the loss 3.7e-4 off at step 1; 10% more
# z-loss, 42 values); experts per token moves by ~5e-4 per flipped routing decision (1 of 4 layers
# x 256 tokens), so 1e-3 tolerates two near-tie flips.
TOLERANCE = {"loss": 1e-4, "lm_loss": 1e-4, "grad_norm": 5e-4, "experts_per_token": 1e-3}


def run_recipe(recipe: dict, run_dir: Path) -> list[dict]:
    """Train the recipe in `run_dir`; per step {"step", "loss", "lm_loss", "grad_norm", "experts_per_token"}."""
    from moekit.train import train
    from moekit.train.presets import preset

    model_cfg, train_cfg = preset(recipe["preset"])
    train_cfg = dataclasses.replace(train_cfg, **recipe["train"])
    threads = torch.get_num_threads()
    try:
        train(model_cfg, train_cfg, run_dir, progress=False, log=lambda *a, **k: None)
    finally:
        torch.set_num_threads(threads)  # train() pins the process to recipe["train"]["threads"]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    return [{"step": r["step"], **{key: r[key] for key in TOLERANCE}} for r in rows]


def compare(got: list[dict], golden: dict) -> list[str]:
    """One line per value outside the golden file's tolerance (empty: the curves agree)."""
    want, tol = golden["steps"], golden["tolerance"]
    if [r["step"] for r in got] != [r["step"] for r in want]:
        return [f"steps {[r['step'] for r in got]} != golden steps {[r['step'] for r in want]}"]
    bad = []
    for g, w in zip(got, want, strict=True):
        for key, rtol in tol.items():
            if abs(g[key] - w[key]) > rtol * max(abs(w[key]), 1e-12):
                bad.append(f"step {w['step']} {key}: {g[key]!r} vs golden {w[key]!r} (rtol {rtol:g})")
    return bad


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="compare with the golden file instead of writing it")
    p.add_argument("--out", type=Path, default=GOLDEN, help=f"golden file (default {GOLDEN})")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        got = run_recipe(RECIPE, Path(tmp) / "run")
    if args.check:
        bad = compare(got, json.loads(args.out.read_text(encoding="utf-8")))
        print("\n".join(bad) or f"{args.out}: all {len(got)} steps agree")
        return 1 if bad else 0
    from moekit.utils.io import atomic_write_text

    golden = {"recipe": RECIPE, "tolerance": TOLERANCE, "torch": torch.__version__,
              "regenerate": "PYTHONPATH=src python scripts/make_golden.py", "steps": got}
    atomic_write_text(args.out, json.dumps(golden, indent=1) + "\n")
    print(f"wrote {args.out}: {len(got)} steps, final lm_loss {got[-1]['lm_loss']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
