"""`moekit offload RUN|--hf DIR OUT`, and the offload part of `moekit generate`.

  moekit offload RUN|--hf DIR OUT
      write the expert store OUT (checksummed, atomic, marked as moekit's) that `generate
      --expert-store OUT` then reuses.
  moekit generate RUN|--hf DIR --expert-budget 25% --policy lru|lfu|static|predictive
      `add_offload_arguments(generate_parser)` (they import moekit.offload, so moekit.cli.generate adds
      them late); with --expert-budget, generate calls `run_offloaded(args, model, tokenizer, prompt_BT, eos_id)`
      with the model it loaded.

Errors are raised (UsageError, ExpertStoreError, NotOwnedError, ...); moekit.cli prints them as one line.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from moekit.errors import UsageError

__all__ = ["add_offload_arguments", "add_parser", "check_budget_form", "run", "run_offloaded"]


def add_offload_arguments(parser: argparse.ArgumentParser) -> None:
    """The --expert-budget group of `moekit generate` (imports moekit.offload, hence torch)."""
    from moekit.cli import takes_dash_values
    from moekit.offload.budget import POLICIES, SCOPES
    from moekit.offload.store import VERIFY_MODES

    g = parser.add_argument_group("memory-constrained inference (moekit.offload)")
    g.add_argument("--expert-budget", metavar="BUDGET", default=None,
                   help="keep at most this much expert weight resident: a percentage of all experts ('25%%') or "
                        "a size with a unit ('512MB', '1.5GiB'); a bare number is a whole number of bytes (one "
                        "below 1 is refused, as are zero and negative budgets); experts are read from an expert "
                        "store on disk")
    takes_dash_values(parser, "--expert-budget")  # `--expert-budget -5%`: refused as a budget, not as a flag
    g.add_argument("--policy", choices=POLICIES, default="lru",
                   help="expert cache policy (default lru); static needs --hot-trace; predictive prefetches the "
                        "next layer's experts from its gate")
    g.add_argument("--cache-scope", choices=SCOPES, default="layer",
                   help="one cache per MoE layer (default) or one shared by all layers")
    g.add_argument("--expert-store", metavar="DIR", default=None,
                   help="expert store directory (default: RUN/expert-store, reused while the checkpoint is "
                        "unchanged; a temporary one for --hf); write one with `moekit offload`")
    g.add_argument("--hot-trace", metavar="FILE", default=None,
                   help="routing trace whose most used experts form the static hot set (e.g. OUT/trace.npz of "
                        "`moekit analyze`)")
    g.add_argument("--verify-experts", choices=VERIFY_MODES, default="first",
                   help="check each expert's sha256 on its first read (default), on every read, or never")
    g.add_argument("--offload-json", metavar="FILE", default=None, help="also write the run's figures as JSON")


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("offload", help="write an expert store (checksummed, atomic) for memory-constrained "
                                   "inference")
    parser.usage = "%(prog)s [-h] RUN OUT | %(prog)s [-h] --hf DIR OUT"
    parser.add_argument("paths", nargs="+", metavar="PATH",
                        help="RUN OUT: a moekit run directory and the store directory to write (absent, empty or "
                             "a moekit store); with --hf DIR: OUT only")
    parser.add_argument("--hf", metavar="DIR", help="a local transformers checkpoint directory instead of RUN")


def check_budget_form(budget: str) -> None:
    """Refuse a malformed, zero or negative --expert-budget before the model is loaded; whether it holds the
    experts a token needs is checked against the model (`plan_offload`) once it is."""
    from moekit.offload.budget import parse_budget

    parse_budget(budget, 2**62)  # NOTE: any total; a percentage's range and a size's sign do not depend on it


def _source(args, model) -> dict:
    if getattr(args, "run", None):
        from moekit.offload.load import run_source

        return run_source(Path(args.run))
    return {"kind": "hf", "path": str(Path(args.hf).resolve())}


def run_offloaded(args: argparse.Namespace, model, tokenizer, prompt_BT, eos_id) -> int:
    """Generate with the model's experts offloaded; prints the text and the run's figures. `eos_id`: the id(s)
    generation stops at (those of the resident run).
    The budget, policy and hot set are checked before anything is written; the model's resident
    expert weights are freed (the CLI owns the model)."""
    from moekit.offload.generate import format_metrics, offloaded_generate, store_matches_model
    from moekit.offload.runtime import expert_shape, plan_offload
    from moekit.offload.store import (
        MANIFEST,
        ExpertStore,
        check_store_target,
        temporary_store_dir,
        write_store,
    )

    if args.policy == "static" and args.hot_trace is None:
        raise UsageError("--policy static needs a hot set; expected --hot-trace FILE (a routing trace, e.g. "
                         "OUT/trace.npz of `moekit analyze`)")
    plan_offload(model, expert_shape(model), args.expert_budget, args.policy, args.cache_scope, args.hot_trace)
    store_dir = args.expert_store
    if store_dir is None and getattr(args, "run", None):
        store_dir = str(Path(args.run) / "expert-store")
    source = _source(args, model)
    current = False
    if store_dir is not None and (Path(store_dir) / MANIFEST).is_file():
        with ExpertStore(store_dir) as st:
            current = st.manifest.get("source") == source and store_matches_model(st, model)
    temp = None
    try:
        if store_dir is None:
            temp = temporary_store_dir()
            store_dir = str(Path(temp) / "store")
        if not current:
            check_store_target(store_dir)
            print(f"moekit generate: writing the expert store {store_dir}", file=sys.stderr)
            write_store(model, store_dir, source=source)
        result = offloaded_generate(model, prompt_BT, args.max_new_tokens, args.expert_budget, args.policy,
                                    scope=args.cache_scope, store_dir=store_dir, hot_set=args.hot_trace,
                                    temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                                    eos_id=eos_id, verify=args.verify_experts,
                                    release=True)
    finally:
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)
    print(tokenizer.decode(result.ids_BT[0].tolist()))
    print(format_metrics(result.metrics), file=sys.stderr)
    if args.offload_json:
        from moekit.utils.io import atomic_write_text

        atomic_write_text(Path(args.offload_json), json.dumps(result.metrics, indent=2, default=float) + "\n")
    return 0


def run(args: argparse.Namespace) -> int:
    """`moekit offload RUN|--hf DIR OUT`: write the expert store OUT (refused before loading the model if
    OUT is not absent, empty or a moekit store); `generate ... --expert-store OUT` reuses it."""
    from moekit.offload.budget import format_bytes
    from moekit.offload.store import ExpertStore, check_store_target, write_store

    want = 1 if args.hf is not None else 2
    if len(args.paths) != want:
        raise UsageError("give RUN OUT, or --hf DIR OUT" + (f" (got {len(args.paths)} paths)" if args.paths else ""))
    args.run, out = (None, args.paths[0]) if args.hf is not None else args.paths
    check_store_target(out)
    if args.hf is not None:
        from moekit.cli.common import load_hf_dir
        from moekit.hf.adapters import HFCausalLM

        hf_model, _ = load_hf_dir(args.hf)
        model = HFCausalLM(hf_model).eval()
    else:
        from moekit.train import load_trained

        model, _, _ = load_trained(args.run)
    path = write_store(model, out, source=_source(args, model))
    with ExpertStore(path) as st:
        print(f"moekit offload: wrote {path}: {st.num_layers} MoE layers x {st.num_experts} experts, "
              f"{format_bytes(st.total_nbytes)} of experts ({format_bytes(st.expert_nbytes)} each), sha256 per expert")
    src = f"--hf {args.hf}" if args.hf is not None else args.run
    print(f"next: moekit generate {src} --prompt TEXT --expert-budget 25% --expert-store {path}")
    return 0
