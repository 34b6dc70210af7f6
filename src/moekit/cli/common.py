"""Helpers shared by the inference subcommands (eval, generate, analyze, offload)."""

from __future__ import annotations

import argparse

from moekit.errors import UsageError


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (argparse names the flag in its one-line error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def positive(value: int, flag: str) -> int:
    """`value` if it is >= 1, else UsageError naming `flag`."""
    if value < 1:
        raise UsageError(f"{flag} {value} is invalid; allowed: an integer >= 1")
    return value


def add_model_source(parser: argparse.ArgumentParser) -> None:
    """RUN or --hf DIR."""
    parser.add_argument("run", nargs="?", help="a moekit run directory")
    parser.add_argument("--hf", metavar="DIR", help="a local transformers checkpoint directory (wrapped by moekit)")


def load_hf_dir(path):
    """(wrapped transformers model, tokenizer or None) from --hf DIR: a transformers checkpoint, or a
    directory `moekit compress --hf` wrote (its record rebuilds the compressed blocks)."""
    import moekit.hf
    from moekit.compress.hf import is_compressed_hf, load_hf

    return load_hf(path) if is_compressed_hf(path) else moekit.hf.load_pretrained(path)


def load_for_inference(args: argparse.Namespace):
    """(model with moe_layers(), tokenizer, seq_len, the run's TrainConfig or None) from RUN or --hf DIR."""
    if (args.run is None) == (args.hf is None):
        raise UsageError(f"moekit {args.command}: give exactly one of RUN and --hf DIR")
    seq_len = getattr(args, "seq_len", None)
    if seq_len is not None:
        positive(seq_len, "--seq-len")
    if args.hf is not None:
        from moekit.hf.adapters import HFCausalLM, tokenizer_for

        hf_model, tok = load_hf_dir(args.hf)
        return HFCausalLM(hf_model).eval(), tokenizer_for(tok, hf_model.config.vocab_size), seq_len or 256, None
    from moekit.train import load_trained

    model, cfg, tokenizer = load_trained(args.run)
    seq_len = seq_len or cfg.seq_len
    if seq_len > model.cfg.max_seq_len:
        raise UsageError(f"--seq-len {seq_len} is invalid; allowed: at most the model's max_seq_len "
                         f"({model.cfg.max_seq_len})")
    return model, tokenizer, seq_len, cfg


def eval_table(result: dict) -> str:
    """The per-domain table of an `evaluate` result."""
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
