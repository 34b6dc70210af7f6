"""`moekit` command line.

  moekit info                          versions, routers, compute backends
  moekit train [--preset NAME] [--out RUN] [--resume] [--SECTION.FIELD VALUE ...]
  moekit eval RUN                      validation loss / bits per byte, overall and per domain
  moekit generate RUN --prompt TEXT    greedy, temperature or top-p sampling with a KV cache
  moekit compare --presets A,B,...     equal-terms training of router families, one table
  moekit export RUN --to hf DIR        a transformers checkpoint with the identical routing rule
  moekit analyze RUN|--hf DIR|TRACE    routing metrics and an HTML report
  moekit offload RUN|--hf DIR OUT      write an expert store for `generate --expert-budget`
  moekit compress RUN --out DIR        prune, merge or quantise the experts (a new run)
  moekit bench NAME [ARGS]             a benchmark script (JSON lines)

Every mistake ends in one line, `moekit COMMAND: message`, with exit code 2 for a usage error (a bad
flag, argument or path) and 1 for a failure (a damaged file, a full disk); Ctrl-C exits with 130.
MOEKIT_DEBUG=1 shows the traceback instead.
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
import runpy
import sys
from pathlib import Path

import torch

import moekit
from moekit.errors import MoekitError
from moekit.ops.grouped import compute_dtype, cpu_has_native_low_precision, grouped_mm_available

BENCHMARKS = ("layer", "hf", "analysis", "offload", "train")


def _info(_args) -> int:
    print(f"moekit {moekit.__version__}, torch {torch.__version__}")
    print(f"routers: {', '.join(moekit.registered_routers())}")
    print(f"grouped GEMM kernel (torch._grouped_mm): {'yes' if grouped_mm_available() else 'no (loop fallback)'}")
    native = cpu_has_native_low_precision()
    print(f"CPU bf16 instructions: {'yes' if native else 'no'}; bf16 expert GEMMs on CPU run in "
          f"{str(compute_dtype(torch.bfloat16, torch.device('cpu'))).replace('torch.', '')}")
    print(f"CUDA available: {torch.cuda.is_available()}")
    return 0


def _bench(args) -> int:
    script = Path(__file__).resolve().parents[2] / "benchmarks" / f"{args.name}.py"
    if not script.is_file():
        raise FileNotFoundError(errno.ENOENT, "benchmark script not found (benchmarks run from a source checkout "
                                "of moekit)", str(script))
    sys.argv = [str(script), *args.rest]
    runpy.run_path(str(script), run_name="__main__")
    return 0


def _configs(args):
    """The preset's configs with the flags applied (validated when training starts)."""
    from moekit.train.flags import apply_flags
    from moekit.train.presets import preset

    return apply_flags(*preset(args.preset or "tiny"), args)


def _print_config(model_cfg, train_cfg) -> None:
    from moekit.train.trainer import resolved_config

    print("resolved config:\n" + json.dumps(resolved_config(model_cfg, train_cfg), indent=2))


def _train(args) -> int:
    from moekit.train import train
    from moekit.train.flags import apply_flags, flag_errors
    from moekit.train.presets import preset
    from moekit.train.rundir import check_owned
    from moekit.train.trainer import load_run_config, resolve_configs

    with flag_errors():
        if args.resume:
            # The run's own configuration; a flag (or --preset) that changes it is refused by train().
            check_owned(args.out, "run", "moekit train")
            base = preset(args.preset) if args.preset else load_run_config(args.out)
            model_cfg, train_cfg = apply_flags(*base, args)
        else:
            model_cfg, train_cfg = resolve_configs(*_configs(args))
        _print_config(model_cfg, train_cfg)
        result = train(model_cfg, train_cfg, args.out, resume=args.resume, progress=not args.no_progress)
    print(_eval_table(result))
    print("experts per token by layer: " + " ".join(f"{k:.2f}" for k in result["experts_per_token_by_layer"]))
    print(f"next: moekit analyze {args.out} --out {args.out}/report   (HTML report of the routing)")
    return 0


def _positive(value: int, flag: str) -> int:
    from moekit.errors import UsageError

    if value < 1:
        raise UsageError(f"{flag} {value} is invalid; allowed: an integer >= 1")
    return value


def _load_for_inference(args):
    """(model with moe_layers(), tokenizer, seq_len, the run's TrainConfig or None) from RUN or --hf DIR."""
    from moekit.errors import UsageError

    if (args.run is None) == (args.hf is None):
        raise UsageError(f"moekit {args.command}: give exactly one of RUN and --hf DIR")
    seq_len = getattr(args, "seq_len", None)
    if seq_len is not None:
        _positive(seq_len, "--seq-len")
    if args.hf is not None:
        import moekit.hf
        from moekit.hf.adapters import HFCausalLM, tokenizer_for

        hf_model, tok = moekit.hf.load_pretrained(args.hf)
        return HFCausalLM(hf_model).eval(), tokenizer_for(tok, hf_model.config.vocab_size), seq_len or 256, None
    from moekit.train import load_trained

    model, cfg, tokenizer = load_trained(args.run)
    seq_len = seq_len or cfg.seq_len
    if seq_len > model.cfg.max_seq_len:
        raise UsageError(f"--seq-len {seq_len} is invalid; allowed: at most the model's max_seq_len "
                         f"({model.cfg.max_seq_len})")
    return model, tokenizer, seq_len, cfg


def _eval(args) -> int:
    from moekit.train import evaluate
    from moekit.train.evaluate import measured_active_params

    model, tokenizer, seq_len, run_cfg = _load_for_inference(args)
    # Default: the run's own eval_tokens, so `moekit eval RUN` reproduces training's final evaluation.
    tokens = _positive(args.tokens, "--tokens") if args.tokens is not None else (
        run_cfg.eval_tokens if run_cfg is not None else 16384)
    result = evaluate(model, tokenizer, seq_len, tokens)
    result["seq_len"], result["eval_tokens"] = seq_len, tokens
    if run_cfg is not None:
        result["params"] = model.cfg.num_params()
        result["active_params"] = measured_active_params(model.cfg, result["experts_per_token_by_layer"])
        result["active_params_config"] = model.cfg.num_active_params()
    print(json.dumps(result, indent=2) if args.json else _eval_table(result))
    return 0


def _eval_table(result) -> str:
    from moekit.train.evaluate import UNIGRAM_NOTE

    lines = [f"{'domain':<10} {'loss':>8} {'bpb':>7} {'unigram':>8} {'experts/token':>14}"]
    for d, r in result["per_domain"].items():
        lines.append(f"{d:<10} {r['loss']:8.4f} {r['bpb']:7.3f} {r['unigram_bpb']:8.3f} {r['experts_per_token']:14.2f}")
    lines.append(f"{'all':<10} {result['loss']:8.4f} {result['bpb']:7.3f} {result['unigram_bpb']:8.3f} "
                 f"{result['experts_per_token']:14.2f}")
    lines.append(f"evaluated {result['eval_tokens']} tokens per domain (at most) in windows of {result['seq_len']}; "
                 + UNIGRAM_NOTE)
    if "active_params" in result:
        lines.append(f"active parameters per token: {result['active_params']:,} measured (from the experts per "
                     f"token above) of {result['params']:,}; the config's count is {result['active_params_config']:,}")
    return "\n".join(lines)


def _prompt_ids(text: str, tokenizer) -> list[int]:
    """Token ids of `--prompt`. A prompt that is not valid UTF-8 reaches Python with its bad bytes as
    surrogate escapes; the byte tokenizer takes those bytes as they are, others refuse it."""
    from moekit.data import ByteTokenizer
    from moekit.errors import UsageError

    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raw = os.fsencode(text)
        if isinstance(tokenizer, ByteTokenizer):
            return list(raw)
        offset = len(text[:e.start].encode("utf-8", errors="surrogateescape"))
        raise UsageError(f"--prompt is not valid UTF-8 (byte 0x{raw[offset]:02x} at offset {offset}); this model's "
                         "tokenizer needs UTF-8 text") from None
    return tokenizer.encode(text)


def _generate(args) -> int:
    from moekit.errors import UsageError
    from moekit.models.generate import generate

    _positive(args.max_new_tokens, "--max-new-tokens")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise UsageError(f"--temperature {args.temperature} is invalid; allowed: a finite number >= 0 (0 = greedy)")
    if not 0 < args.top_p <= 1:
        raise UsageError(f"--top-p {args.top_p} is invalid; allowed: a number in (0, 1]")
    if args.seed < 0:
        raise UsageError(f"--seed {args.seed} is invalid; allowed: an integer >= 0")
    model, tokenizer, _, _ = _load_for_inference(args)
    prompt = [tokenizer.bos_id] if args.bos else []
    prompt += _prompt_ids(args.prompt, tokenizer)
    if not prompt:
        raise UsageError("moekit generate: empty prompt (give --prompt TEXT or --bos)")
    limit = getattr(getattr(model, "cfg", None), "max_seq_len", None)
    if limit is not None and len(prompt) + args.max_new_tokens > limit:
        raise UsageError(f"--max-new-tokens {args.max_new_tokens} is invalid: with the prompt's {len(prompt)} tokens "
                         f"it exceeds the model's max_seq_len {limit}; allowed: at most {limit - len(prompt)}")
    prompt_BT = torch.tensor([prompt])
    if getattr(args, "expert_budget", None) is not None:
        from moekit.offload.cli import run_offloaded

        return run_offloaded(args, model, tokenizer, prompt_BT)
    if args.hf is not None:  # transformers' own generate loop and KV cache, with moekit's routing inside
        torch.manual_seed(args.seed)
        sampling = {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p} if args.temperature > 0 \
            else {"do_sample": False}
        ids = model.model.generate(prompt_BT, max_new_tokens=args.max_new_tokens, pad_token_id=tokenizer.pad_id,
                                   **sampling)
    else:
        ids = generate(model, prompt_BT, args.max_new_tokens, temperature=args.temperature,
                       top_p=args.top_p, seed=args.seed, eos_id=tokenizer.eos_id)
    print(tokenizer.decode(ids[0].tolist()))
    return 0


def _compare(args) -> int:
    from moekit.train.compare import compare
    from moekit.train.flags import apply_flags, flag_errors
    from moekit.train.presets import preset
    from moekit.train.trainer import resolve_configs

    with flag_errors():
        variants = {name: resolve_configs(*apply_flags(*preset(name), args)) for name in args.presets.split(",")}
        compare(variants, args.out, progress=not args.no_progress)
    return 0


def _export(args) -> int:
    from moekit.hf.export import check_export_target, export_hf
    from moekit.train import load_trained

    check_export_target(args.dir)  # before the model is loaded
    model, _, _ = load_trained(args.run)
    path = export_hf(model, args.dir)
    print(f"moekit export: wrote {path} (config.json + safetensors); load it with "
          f"AutoModelForCausalLM.from_pretrained({str(path)!r})")
    return 0


def _preset_in(argv: list[str]) -> str:
    """The --preset named on a command line (tiny if none or an unknown one)."""
    from moekit.train.presets import PRESETS

    for i, arg in enumerate(argv):
        if arg == "--preset" and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith("--preset="):
            value = arg.split("=", 1)[1]
        else:
            continue
        return value if value in PRESETS else "tiny"
    return "tiny"


def _add_offload_arguments(parser) -> None:
    from moekit.offload.cli import add_offload_arguments

    add_offload_arguments(parser)


def _one_line(e: BaseException) -> str:
    """The message of an error as one line (OSErrors as 'reason: path')."""
    if isinstance(e, OSError) and e.strerror:
        msg = e.strerror + (f": {e.filename}" if e.filename else "")
        if e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            msg += "; nothing was left half-written: free some space (or raise the limit) and run it again"
    elif isinstance(e, MemoryError):
        msg = f"out of memory{': ' + str(e) if str(e) else ''}"
    else:
        msg = str(e) or type(e).__name__
    return " ".join(part.strip() for part in msg.splitlines() if part.strip())


def _exit_code(e: BaseException) -> int:
    """2 for a usage error (bad flag, argument or path), 1 for a failure."""
    if isinstance(e, MoekitError):
        return e.exit_code
    if isinstance(e, FileNotFoundError | NotADirectoryError | IsADirectoryError | FileExistsError):
        return 2
    if isinstance(e, ValueError) and not isinstance(e, UnicodeDecodeError | json.JSONDecodeError):
        return 2  # config validation and argument checks raise ValueError naming the field
    return 1


# What main() reports as one line; anything else is a bug in moekit and keeps its traceback.
_USER_ERRORS = (MoekitError, ValueError, OSError, MemoryError)


def main(argv: list[str] | None = None) -> int:
    """Run one command; every error a user can cause ends as one line on stderr (see the module doc)."""
    parser = _parser(argv)
    args = parser.parse_args(argv)  # argparse prints usage errors itself and exits with 2
    debug = os.environ.get("MOEKIT_DEBUG", "") not in ("", "0")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        if debug:
            raise
        if argv is None:  # the `moekit` command itself, not a caller's main([...])
            # NOTE: every finally block has run (temporary files removed, worker processes terminated);
            # skip the interpreter's teardown, which takes seconds with torch loaded, so Ctrl-C ends now.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(130)
        return 130  # as a shell reports a process ended by SIGINT; nothing to add to the user's Ctrl-C
    except SystemExit as e:
        if isinstance(e.code, str) and not debug:  # raise SystemExit("message"): a usage error
            print(_one_line(e.code if e.code.startswith("moekit ") else f"moekit {args.command}: {e.code}"),
                  file=sys.stderr)
            return 2
        raise
    except _USER_ERRORS as e:
        if debug:
            raise
        msg = _one_line(e)
        print(msg if msg.startswith(f"moekit {args.command}") else f"moekit {args.command}: {msg}", file=sys.stderr)
        return _exit_code(e)


def _parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moekit", description="Mixture-of-Experts models with dynamic routing.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, routers and compute backends").set_defaults(func=_info)
    from moekit.train.flags import add_config_flags
    from moekit.train.presets import PRESETS, preset

    t = sub.add_parser("train", help="train a MoE language model on the embedded corpus")
    t.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="starting configuration (default tiny; with --resume: the run's own)")
    t.add_argument("--out", default="runs/tiny", help="run directory (default runs/tiny)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    help_preset = _preset_in(sys.argv[1:] if argv is None else argv)  # so --help shows that preset's values
    add_config_flags(t, preset(help_preset), help_preset)
    t.set_defaults(func=_train)
    e = sub.add_parser("eval", help="evaluate a run or a transformers checkpoint on the validation split")
    e.add_argument("run", nargs="?", help="a moekit run directory")
    e.add_argument("--hf", metavar="DIR", help="a local transformers checkpoint directory (wrapped by moekit)")
    e.add_argument("--seq-len", type=int, default=None, help="window length (default: the run's training length, 256 for --hf)")
    e.add_argument("--tokens", type=int, default=None,
                   help="validation tokens per domain (default: the run's train.eval_tokens, as its final "
                        "evaluation; 16384 for --hf)")
    e.add_argument("--json", action="store_true", help="print the full JSON result")
    e.set_defaults(func=_eval)
    g = sub.add_parser("generate", help="generate text from a run or a transformers checkpoint")
    g.add_argument("run", nargs="?", help="a moekit run directory")
    g.add_argument("--hf", metavar="DIR", help="a local transformers checkpoint directory (wrapped by moekit)")
    g.add_argument("--prompt", default="", help="text to continue (UTF-8; other bytes go to a byte-level model as they are)")
    g.add_argument("--bos", action="store_true", help="start with the BOS token")
    g.add_argument("--max-new-tokens", type=int, default=200)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (default 1.0 = off)")
    g.add_argument("--seed", type=int, default=0)
    _add_offload_arguments(g)
    g.set_defaults(func=_generate)
    x = sub.add_parser("export", help="write a trained run as a transformers checkpoint (identical routing)")
    x.add_argument("run")
    x.add_argument("--to", choices=["hf"], required=True, help="target format (hf: transformers)")
    x.add_argument("dir", help="output directory (must not exist or be empty)")
    x.set_defaults(func=_export)
    a = sub.add_parser("analyze", help="routing metrics and an HTML report (RUN, --hf DIR or a trace file)")
    from moekit.analysis import cli as analysis_cli

    analysis_cli.add_arguments(a)
    a.set_defaults(func=analysis_cli.run)
    c = sub.add_parser("compare", help="train router families on equal terms and print one table")
    c.add_argument("--presets", default="topk,topp", help="comma-separated preset names (default topk,topp)")
    c.add_argument("--out", default="runs/compare")
    c.add_argument("--no-progress", action="store_true")
    add_config_flags(c)
    c.set_defaults(func=_compare)
    o = sub.add_parser("offload", help="write an expert store (checksummed, atomic) for memory-constrained inference")
    from moekit.offload import cli as offload_cli

    offload_cli.add_store_arguments(o)
    o.set_defaults(func=offload_cli.write_store_command)
    from moekit.compress import cli as compress_cli

    compress_cli.add_parser(sub)
    b = sub.add_parser("bench", help="run a benchmark script (prints JSON lines)")
    b.add_argument("name", choices=BENCHMARKS)
    b.add_argument("rest", nargs=argparse.REMAINDER, help="arguments passed to the benchmark, e.g. --quick")
    b.set_defaults(func=_bench)
    return parser


if __name__ == "__main__":
    sys.exit(main())
