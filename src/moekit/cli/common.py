"""Helpers shared by the inference subcommands (eval, generate, analyze, offload)."""

from __future__ import annotations

import argparse
import dataclasses
from typing import NamedTuple

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
    """RUN or --hf DIR, and --route."""
    parser.add_argument("run", nargs="?", help="a moekit run directory")
    parser.add_argument("--hf", metavar="DIR", help="a local transformers checkpoint directory (wrapped by moekit)")
    add_route_argument(parser)


class RouteSpec(NamedTuple):
    """One `--route` value: the router kind (None: the layers' own) and FIELD -> VALUE text."""

    text: str
    kind: str | None
    settings: dict[str, str]


def route_spec(text: str) -> RouteSpec:
    """argparse type of --route: `KIND[,FIELD=VALUE,...]` or `FIELD=VALUE[,...]` (the syntax only; the kind,
    fields and values are checked against the registered routers by `apply_route`, which imports torch)."""
    expected = "expected KIND[,FIELD=VALUE,...] or FIELD=VALUE[,...], e.g. 'topp,p=0.5'"
    items = [item.strip() for item in text.split(",")]
    if not any(items):
        raise argparse.ArgumentTypeError(f"empty re-route {text!r}; {expected}")
    kind = None if "=" in items[0] else items.pop(0)
    settings: dict[str, str] = {}
    for item in items:
        name, sep, value = (part.strip() for part in item.partition("="))
        if not sep or not name or not value:
            raise argparse.ArgumentTypeError(f"{text!r}: {item!r} is not FIELD=VALUE; {expected}")
        if name in settings or (name == "kind" and kind is not None):
            raise argparse.ArgumentTypeError(f"{text!r}: {name!r} is given twice; {expected}")
        settings[name] = value
    return RouteSpec(text, settings.pop("kind", kind), settings)


ROUTE_HELP = ("re-route the model before it runs (moekit.route on every MoE layer; the weights are unchanged): a "
              "router kind and/or its RouterConfig fields, KIND[,FIELD=VALUE,...] or FIELD=VALUE[,...], e.g. "
              "--route topp,p=0.5,min_k=1 (top-p over the same gate), --route k=1 (the model's own rule, one "
              "expert), --route null,n_null=8,k=4; repeat --route to nest re-routes, applied in order (e.g. "
              "--route score=softmax,n_group=1,topk_group=1 --route null,n_null=8,k=4 on a sigmoid-scored model)")


def add_route_argument(parser: argparse.ArgumentParser) -> None:
    """--route SPEC (repeatable): the re-route of every command that runs a model (`apply_route`)."""
    parser.add_argument("--route", metavar="SPEC", type=route_spec, action="append", default=None, help=ROUTE_HELP)


def _route_changes(spec: RouteSpec, kinds: list[str]) -> dict:
    """The `moekit.route` keyword arguments of `spec` (the kind included when given), its fields looked up in the
    config classes of `kinds` (spec's kind, or the layers' own); UsageError naming the --route value."""
    from moekit.cli.flags import field_converter
    from moekit.config import router_config_class
    from moekit.routers import registered_routers

    where = f"--route {spec.text!r}"
    if spec.kind is not None and spec.kind not in registered_routers():
        raise UsageError(f"{where}: unknown router kind {spec.kind!r}; expected one of {', '.join(registered_routers())}")
    fields = {f.name: f for kind in kinds for f in dataclasses.fields(router_config_class(kind)) if f.name != "kind"}
    changes = {} if spec.kind is None else {"kind": spec.kind}
    for name, text in spec.settings.items():
        if name not in fields:
            owner = f"router kind {kinds[0]!r}" if len(kinds) == 1 else f"the model's router kinds {kinds}"
            raise UsageError(f"{where}: {name!r} is not a field of {owner}; expected one of {', '.join(sorted(fields))}")
        try:
            changes[name] = field_converter(str(fields[name].type), name)(text)
        except argparse.ArgumentTypeError as e:
            raise UsageError(f"{where}: {e}") from None
    return changes


def check_route(specs: list[RouteSpec] | None) -> None:
    """Check the --route values that name a kind before a model is loaded (those that do not are checked against
    the model's own router kinds by `apply_route`)."""
    for spec in specs or ():
        if spec.kind is not None:
            _route_changes(spec, [spec.kind])


def apply_route(model, specs: list[RouteSpec] | None) -> list:
    """Apply each --route to `model` in order (`moekit.route`, all MoE layers); returns the `Applied` handles (the
    re-routes stay in force whether they are kept or not; `restore()` on them, latest first, undoes them).
    UsageError (one line naming the --route value, the problem and what was expected) for an unknown kind or
    field, a value of the wrong type, or a re-route `moekit.route` refuses (its message passed through)."""
    if not specs:
        return []
    import moekit
    from moekit.layers import moe_layers

    handles = []
    for spec in specs:
        layers = moe_layers(model)
        if not layers:
            raise UsageError(f"--route {spec.text!r}: the model has no MoE layers to re-route")
        kinds = [spec.kind] if spec.kind is not None else sorted({layer.router.cfg.kind for layer in layers})
        changes = _route_changes(spec, kinds)
        try:
            handles.append(moekit.route(model, **changes))
        except ValueError as e:  # UsageError too
            raise UsageError(f"--route {spec.text!r}: {str(e).removeprefix('route(): ')}") from None
    return handles


def load_hf_dir(path):
    """(wrapped transformers model, tokenizer or None) from --hf DIR: a transformers checkpoint, or a
    directory `moekit compress --hf` wrote (its record rebuilds the compressed blocks)."""
    import moekit.hf
    from moekit.compress.hf import is_compressed_hf, load_hf

    return load_hf(path) if is_compressed_hf(path) else moekit.hf.load_pretrained(path)


def load_for_inference(args: argparse.Namespace):
    """(model with moe_layers(), tokenizer, seq_len, the run's TrainConfig or None) from RUN or --hf DIR, re-routed
    as --route says (the handles kept in `args.route_handles`)."""
    if (args.run is None) == (args.hf is None):
        raise UsageError(f"moekit {args.command}: give exactly one of RUN and --hf DIR")
    seq_len = getattr(args, "seq_len", None)
    if seq_len is not None:
        positive(seq_len, "--seq-len")
    check_route(getattr(args, "route", None))  # before minutes of loading
    if args.hf is not None:
        from moekit.hf.adapters import HFCausalLM, tokenizer_for

        hf_model, tok = load_hf_dir(args.hf)
        model = HFCausalLM(hf_model).eval()
        args.route_handles = apply_route(model, getattr(args, "route", None))  # kept while the command runs
        return model, tokenizer_for(tok, hf_model.config.vocab_size), seq_len or 256, None
    from moekit.train import load_trained

    model, cfg, tokenizer = load_trained(args.run)
    args.route_handles = apply_route(model, getattr(args, "route", None))
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
