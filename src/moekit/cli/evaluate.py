"""`moekit eval RUN | --hf DIR`: validation loss and bits per byte, overall and per domain."""

from __future__ import annotations

import json

from moekit.cli.common import add_model_source, eval_table, load_for_inference, positive


def add_parser(subparsers) -> None:
    e = subparsers.add_parser("eval", help="evaluate a run or a transformers checkpoint on the validation split")
    add_model_source(e)
    e.add_argument("--seq-len", type=int, default=None,
                   help="window length (default: the run's training length, 256 for --hf)")
    e.add_argument("--tokens", type=int, default=None,
                   help="validation tokens per domain (default: the run's train.eval_tokens, as its final "
                        "evaluation; 16384 for --hf)")
    e.add_argument("--json", action="store_true", help="print the full JSON result")


def run(args) -> int:
    from moekit.train import evaluate
    from moekit.train.evaluate import measured_active_params

    model, tokenizer, seq_len, run_cfg = load_for_inference(args)
    # Default: the run's own eval_tokens, so `moekit eval RUN` reproduces training's final evaluation.
    tokens = positive(args.tokens, "--tokens") if args.tokens is not None else (
        run_cfg.eval_tokens if run_cfg is not None else 16384)
    result = evaluate(model, tokenizer, seq_len, tokens)
    result["seq_len"], result["eval_tokens"] = seq_len, tokens
    if run_cfg is not None:
        result["params"] = model.cfg.num_params()
        result["active_params"] = measured_active_params(model.cfg, result["experts_per_token_by_layer"])
        result["active_params_config"] = model.cfg.num_active_params()
    print(json.dumps(result, indent=2) if args.json else eval_table(result))
    return 0
