"""`moekit generate RUN|--hf DIR --expert-budget 25% --policy lru|lfu|static|predictive`.

moekit.cli calls `add_offload_arguments(generate_parser)` and, when --expert-budget is given,
`run_offloaded(args, model, tokenizer, prompt_BT)` with the model it loaded.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from moekit.offload.cache import POLICIES, SCOPES
from moekit.offload.store import VERIFY_MODES

__all__ = ["add_offload_arguments", "run_offloaded"]


def add_offload_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("memory-constrained inference (moekit.offload)")
    g.add_argument("--expert-budget", metavar="BUDGET", default=None,
                   help="keep at most this much expert weight resident: '25%%' of all experts, bytes, or bytes "
                        "with a unit ('512MiB'); experts are read from an expert store on disk")
    g.add_argument("--policy", choices=POLICIES, default="lru",
                   help="expert cache policy (default lru); static needs --hot-trace; predictive prefetches the "
                        "next layer's experts from its gate")
    g.add_argument("--cache-scope", choices=SCOPES, default="layer",
                   help="one cache per MoE layer (default) or one shared by all layers")
    g.add_argument("--expert-store", metavar="DIR", default=None,
                   help="expert store directory (default: RUN/expert-store, reused while the checkpoint is "
                        "unchanged; a temporary one for --hf)")
    g.add_argument("--hot-trace", metavar="FILE", default=None,
                   help="routing trace whose most used experts form the static hot set (e.g. OUT/trace.npz of "
                        "`moekit analyze`)")
    g.add_argument("--verify-experts", choices=VERIFY_MODES, default="first",
                   help="check each expert's sha256 on its first read (default), on every read, or never")
    g.add_argument("--offload-json", metavar="FILE", default=None, help="also write the run's figures as JSON")


def _source(args, model) -> dict:
    if getattr(args, "run", None):
        from moekit.offload.generate import _run_source

        return _run_source(Path(args.run))
    return {"kind": "hf", "path": str(Path(args.hf).resolve())}


def _prompt(args, tokenizer) -> torch.Tensor:
    ids = [tokenizer.bos_id] if getattr(args, "bos", False) else []
    ids += tokenizer.encode(getattr(args, "prompt", "") or "")
    if not ids:
        raise ValueError("empty prompt (give --prompt TEXT or --bos)")
    return torch.tensor([ids])


def run_offloaded(args: argparse.Namespace, model, tokenizer, prompt_BT: torch.Tensor | None = None) -> int:
    """Generate with the model's experts offloaded; prints the text and the run's figures.
    The model's resident expert weights are freed (the CLI owns the model)."""
    from moekit.offload.generate import format_metrics, offloaded_generate, store_matches_model
    from moekit.offload.store import MANIFEST, ExpertStore, ExpertStoreError, write_store

    temp = None
    try:
        if prompt_BT is None:
            prompt_BT = _prompt(args, tokenizer)
        store_dir = args.expert_store
        if store_dir is None and getattr(args, "run", None):
            store_dir = str(Path(args.run) / "expert-store")
        if store_dir is None:
            temp = tempfile.mkdtemp(prefix="moekit-experts-")
            store_dir = str(Path(temp) / "store")
        source = _source(args, model)
        current = False
        if (Path(store_dir) / MANIFEST).is_file():
            with ExpertStore(store_dir) as st:
                current = st.manifest.get("source") == source and store_matches_model(st, model)
        if not current:
            print(f"moekit generate: writing the expert store {store_dir}", file=sys.stderr)
            write_store(model, store_dir, source=source)
        result = offloaded_generate(model, prompt_BT, args.max_new_tokens, args.expert_budget, args.policy,
                                    scope=args.cache_scope, store_dir=store_dir, hot_set=args.hot_trace,
                                    temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                                    eos_id=getattr(tokenizer, "eos_id", None), verify=args.verify_experts,
                                    release=True)
    except (ValueError, FileNotFoundError, ExpertStoreError) as e:
        print(f"moekit generate: {e}", file=sys.stderr)
        return 2
    finally:
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)
    print(tokenizer.decode(result.ids_BT[0].tolist()))
    print(format_metrics(result.metrics), file=sys.stderr)
    if args.offload_json:
        from moekit.utils.io import atomic_write_text

        atomic_write_text(Path(args.offload_json), json.dumps(result.metrics, indent=2, default=float) + "\n")
    return 0
