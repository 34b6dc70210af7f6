"""`moekit compress RUN|--hf DIR --out DIR [--prune SHARE] [--merge METHOD] [--quantize FORMAT]`.

Loads a moekit run (or a transformers checkpoint, wrapped; saved by moekit.compress.hf.save_hf),
calibrates on text (the embedded corpus's train split by domain, or a UTF-8 file), then prunes, merges and quantises in that order (each step recalibrated on the model the
previous step left), and saves a run that `moekit eval | generate | analyze | offload` read like any
other; its config records what was done. Prints one line per step and a one-screen summary. Errors
are raised; moekit.cli prints them as one line.

Registered in moekit.cli.COMMANDS.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from moekit.cli.common import positive_int

__all__ = ["add_parser", "run"]

# moekit.compress.prune.CRITERIA and merge.METHODS, spelled out so that building the parser imports no
# torch (tests/compress/test_cli.py checks they agree).
CRITERIA = ("freq", "reap", "task")
METHODS = ("m-smoe", "hc-smoe")


def _share(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a share in [0, 1), got {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a share in [0, 1), got {value}")
    return value




def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("compress", help="prune, merge or quantise a run's experts; writes a new run")
    p.add_argument("run", nargs="?", help="a moekit run directory")
    p.add_argument("--hf", metavar="DIR", help="a local transformers checkpoint directory (wrapped by moekit); the output is a transformers "
                        "checkpoint where transformers can hold the result, else moekit's own (moekit.compress.hf)")
    p.add_argument("--out", required=True, help="output directory (absent, empty or what moekit compress wrote)")
    p.add_argument("--prune", type=_share, default=None, metavar="SHARE",
                   help="remove this share of the routed experts (e.g. 0.5)")
    p.add_argument("--criterion", choices=CRITERIA, default="reap",
                   help="which experts go: reap (router weight x output norm, default), freq (routing frequency), "
                        "task (PreMoe: those the --calib text selects least)")
    p.add_argument("--per-layer", action="store_true",
                   help="rank experts over the whole model, so layers keep different counts (default: the same "
                        "share in every layer)")
    p.add_argument("--merge", choices=METHODS, default=None, help="merge experts: m-smoe or hc-smoe")
    p.add_argument("--merge-ratio", type=_share, default=0.5, metavar="SHARE",
                   help="share of each layer's experts merged away (default 0.5)")
    p.add_argument("--quantize", default=None, metavar="FORMAT",
                   help="int8, int4, int2 or mixed:BITS (mean code bits per weight by expert importance, e.g. mixed:3.5)")
    p.add_argument("--group-size", type=positive_int, default=64, help="weights per quantisation scale (default 64)")
    p.add_argument("--no-protect-super", action="store_true",
                   help="do not keep super experts (extreme output outliers) at int8")
    p.add_argument("--calib", default="all", metavar="TEXT_OR_DOMAINS",
                   help="calibration text: a UTF-8 file, or domains of the embedded corpus's train split "
                        "(comma-separated, default all)")
    p.add_argument("--calib-tokens", type=positive_int, default=4096, help="calibration tokens per source (default 4096)")
    p.add_argument("--seq-len", type=positive_int, default=None, help="calibration window (default: the run's seq_len)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from moekit.compress import calibrate, calibration_windows, merge, new_record, prune, quantize
    from moekit.compress.merge import check_mergeable
    from moekit.compress.quantize import check_quantizable, expert_bytes, parse_method
    from moekit.errors import UsageError
    from moekit.experts import ExpertBank
    from moekit.layers.moe import moe_layers
    from moekit.train import load_trained, save_trained
    from moekit.train.rundir import check_owned

    if (args.run is None) == (args.hf is None):
        raise UsageError("moekit compress: give exactly one of RUN and --hf DIR")
    if args.prune is None and args.merge is None and args.quantize is None:
        raise UsageError("moekit compress: nothing to do; give --prune SHARE, --merge METHOD and/or --quantize FORMAT")
    if args.quantize is not None:
        parse_method(args.quantize)  # a bad format fails before any work
    source = args.run if args.run is not None else args.hf
    if Path(args.out).resolve() == Path(source).resolve():
        raise UsageError("moekit compress: --out must differ from the source (the source is never overwritten)")
    if args.hf is not None:
        import moekit.hf
        from moekit.compress.hf import KIND, is_compressed_hf
        from moekit.hf.adapters import HFCausalLM, tokenizer_for
        from moekit.utils.io import check_writable_dir

        if is_compressed_hf(args.hf):
            raise UsageError(f"moekit compress --hf {args.hf}: that directory was written by moekit compress; "
                             "compress the original checkpoint (give every step in one command)")
        check_writable_dir(args.out, KIND, "moekit compress")
        hf_model, hf_tok = moekit.hf.load_pretrained(args.hf)
        model, tokenizer, cfg = HFCausalLM(hf_model).eval(), tokenizer_for(hf_tok, hf_model.config.vocab_size), None
        seq_len = args.seq_len or 128
    else:
        check_owned(args.out, "run", "moekit compress")
        model, cfg, tokenizer = load_trained(args.run)
        seq_len = args.seq_len or cfg.seq_len
        if seq_len > model.cfg.max_seq_len:
            raise UsageError(f"--seq-len {seq_len} is invalid; allowed: at most the model's max_seq_len "
                             f"({model.cfg.max_seq_len})")
    # Experts a step cannot rewrite are refused before calibration (a pass over the calibration text per step).
    for layer in moe_layers(model):
        if args.prune is not None and isinstance(layer.experts, ExpertBank):
            layer.experts.require_standard("prune")
        if args.merge is not None:
            check_mergeable(layer.experts)
        if args.quantize is not None:
            check_quantizable(layer.experts)
    windows = calibration_windows(tokenizer, args.calib, seq_len, args.calib_tokens)
    n_windows = sum(w.shape[0] for w in windows.values())
    passes = sum(x is not None for x in (args.prune, args.merge, args.quantize))
    bar = None
    if not args.no_progress and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=n_windows * passes, desc="calibrate", unit="window", dynamic_ncols=True)
    progress = bar.update if bar is not None else None
    params_before = sum(p.numel() for p in model.parameters())
    bytes_before = expert_bytes(model)
    calib_info = {"source": args.calib, "windows": n_windows, "seq_len": seq_len}
    record = new_record(str(source), calib_info)
    lines = []
    try:
        if args.prune is not None:
            result = prune(model, calibrate(model, windows, progress=progress), args.prune, args.criterion,
                           args.per_layer)
            record["steps"].append(result.to_dict())
            lines.append(result.summary())
        if args.merge is not None:
            calib = calibrate(model, windows, outputs=args.merge == "hc-smoe", progress=progress)
            result = merge(model, calib, args.merge_ratio, args.merge)
            record["steps"].append(result.to_dict())
            lines.append(result.summary())
        if args.quantize is not None:
            calib = calibrate(model, windows, progress=progress)
            result = quantize(model, args.quantize, calib, args.group_size, not args.no_protect_super)
            record["steps"].append(result.to_dict())
            lines.append(result.summary())
    finally:
        if bar is not None:
            bar.close()
    if args.hf is not None:
        from moekit.compress.hf import RECORD, save_hf

        path = save_hf(model.model, record, args.out, hf_tok)
        why_not = json.loads((path / RECORD).read_text())["hf"]["why_not_transformers"]
        where = ("a transformers checkpoint (AutoModelForCausalLM.from_pretrained reads it)" if why_not is None else
                 f"not a transformers checkpoint: {why_not}")
    else:
        path = save_trained(model, cfg, args.out, record)
        where = "a moekit run"
    bytes_after = expert_bytes(model)
    print(f"moekit compress: {source} -> {args.out} ({where})")
    print(f"calibration: {n_windows} windows of {seq_len} tokens from {args.calib} (train split or file)")
    for line in lines:
        print(f"  {line}")
    print(f"expert bytes: {bytes_before:,} -> {bytes_after:,} ({bytes_after / max(bytes_before, 1):.1%}); "
          f"parameters (unquantised count): {params_before:,} -> {sum(p.numel() for p in model.parameters()):,}")
    print(f"wrote {path}")
    flag = "--hf " if args.hf is not None else ""
    print(f"next: moekit eval {flag}{args.out}   |   moekit generate {flag}{args.out} --prompt ...")
    return 0
