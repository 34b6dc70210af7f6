"""`moekit generate RUN | --hf DIR --prompt TEXT`: greedy, temperature or top-p sampling with a KV cache;
with --expert-budget the experts are offloaded (moekit.cli.offload)."""

from __future__ import annotations

import math
import os
import sys

from moekit.cli import late_arguments
from moekit.cli.common import add_model_source, load_for_inference, positive
from moekit.errors import UsageError


def add_parser(subparsers) -> None:
    g = subparsers.add_parser("generate", help="generate text from a run or a transformers checkpoint")
    add_model_source(g)
    g.add_argument("--prompt", default="",
                   help="text to continue (UTF-8; other bytes go to a byte-level model as they are)")
    g.add_argument("--bos", action="store_true", help="start with the BOS token")
    g.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate (default 200)")
    g.add_argument("--temperature", type=float, default=0.0,
                   help="0 = greedy (default); with --hf too: a checkpoint's generation_config sampling settings "
                        "(do_sample, top_k, repetition_penalty, ...) are not applied (a note on stderr names them)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (default 1.0 = off)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")

    def offload_arguments(parser, _argv):
        from moekit.cli.offload import add_offload_arguments

        add_offload_arguments(parser)

    late_arguments(g, offload_arguments)


def prompt_ids(text: str, tokenizer) -> list[int]:
    """Token ids of `--prompt`. A prompt that is not valid UTF-8 reaches Python with its bad bytes as
    surrogate escapes; the byte tokenizer takes those bytes as they are, others refuse it."""
    from moekit.data import ByteTokenizer

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


def run(args) -> int:
    import torch

    from moekit.models.generate import generate
    from moekit.utils.ids import check_token_ids

    positive(args.max_new_tokens, "--max-new-tokens")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise UsageError(f"--temperature {args.temperature} is invalid; allowed: a finite number >= 0 (0 = greedy)")
    if not 0 < args.top_p <= 1:
        raise UsageError(f"--top-p {args.top_p} is invalid; allowed: a number in (0, 1]")
    if args.seed < 0:
        raise UsageError(f"--seed {args.seed} is invalid; allowed: an integer >= 0")
    if getattr(args, "expert_budget", None) is not None:
        from moekit.cli.offload import check_budget_form

        check_budget_form(args.expert_budget)  # before minutes of loading
    model, tokenizer, _, _ = load_for_inference(args)
    prompt = [tokenizer.bos_id] if args.bos else []
    prompt += prompt_ids(args.prompt, tokenizer)
    if not prompt:
        raise UsageError("moekit generate: empty prompt (give --prompt TEXT or --bos)")
    limit = getattr(getattr(model, "cfg", None), "max_seq_len", None)
    if limit is not None and len(prompt) + args.max_new_tokens > limit:
        raise UsageError(f"--max-new-tokens {args.max_new_tokens} is invalid: with the prompt's {len(prompt)} tokens "
                         f"it exceeds the model's max_seq_len {limit}; allowed: at most {limit - len(prompt)}")
    prompt_BT = torch.tensor([prompt])
    # A tokenizer with more ids than the model's embedding (added tokens): one line, not torch's IndexError.
    vocab = model.cfg.vocab_size if hasattr(model, "cfg") else model.vocab_size
    check_token_ids(prompt_BT, vocab, "moekit generate --prompt", "the model's vocabulary; its tokenizer gave more ids")
    # A transformers model stops at its generation_config's eos ids (as its own generate would), a run at its
    # tokenizer's; nothing else of the generation_config (repetition penalty, top_k, ...) applies: the flags say
    # how to sample, for a run and a checkpoint alike.
    eos = model.eos_ids() if args.hf is not None else tokenizer.eos_id
    given = {"do_sample": args.temperature > 0, "temperature": args.temperature, "top_p": args.top_p}  # by the flags
    unapplied = {name: value for name, value in model.unapplied_generation_settings(args.temperature > 0).items()
                 if name not in given or given[name] != value} if args.hf is not None else {}
    if unapplied:
        settings = ", ".join(f"{name}={value}" for name, value in unapplied.items())
        print(f"moekit generate: the checkpoint's generation_config sets {settings}, which moekit generate does not "
              "apply (it samples as --temperature and --top-p say; greedy by default)", file=sys.stderr)
    if getattr(args, "expert_budget", None) is not None:
        from moekit.cli.offload import run_offloaded

        return run_offloaded(args, model, tokenizer, prompt_BT, eos)
    if args.hf is not None:  # the loop offloaded generation runs (same sampler and draws), the model's own KV cache
        from moekit.offload.generate import decode_loop

        ids, _, _ = decode_loop(model, prompt_BT, args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                                seed=args.seed, eos_id=eos, record=False)
    else:
        ids = generate(model, prompt_BT, args.max_new_tokens, temperature=args.temperature,
                       top_p=args.top_p, seed=args.seed, eos_id=tokenizer.eos_id)
    print(tokenizer.decode(ids[0].tolist()))
    return 0
