"""`moekit train [--preset NAME] [--out RUN] [--resume] [--SECTION.FIELD VALUE ...]`: train a MoE language
model on the embedded corpus. The config flags (moekit.cli.flags) are added only when `train` is the
command: their help shows the chosen preset's values."""

from __future__ import annotations

import json
import os

from moekit.cli import config_errors, late_arguments


def preset_in(argv: list[str]) -> str:
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


def add_parser(subparsers) -> None:
    t = subparsers.add_parser("train", help="train a MoE language model on the embedded corpus")
    t.add_argument("--out", default="runs/tiny", help="run directory (default runs/tiny)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")

    def config_flags(parser, argv):
        from moekit.cli.flags import add_config_flags
        from moekit.train.presets import PRESETS, preset

        parser.add_argument("--preset", default=None, choices=sorted(PRESETS),
                            help="starting configuration (default tiny; with --resume: the run's own)")
        name = preset_in(argv)  # so that --help shows that preset's values
        add_config_flags(parser, preset(name), name)

    late_arguments(t, config_flags)


def run(args) -> int:
    from moekit.cli.common import eval_table
    from moekit.cli.flags import apply_flags, flag_errors, parallel_config
    from moekit.train import train
    from moekit.train.presets import preset
    from moekit.train.rundir import check_owned
    from moekit.train.trainer import load_run_config, resolve_configs, resolved_config

    if args.resume:
        # The run's own configuration; a flag (or --preset) that changes it is refused by train().
        check_owned(args.out, "run", "moekit train")
        with config_errors(args.parser):
            model_cfg, train_cfg = apply_flags(*(preset(args.preset) if args.preset else load_run_config(args.out)),
                                               args)
    else:
        with config_errors(args.parser):
            model_cfg, train_cfg = resolve_configs(*apply_flags(*preset(args.preset or "tiny"), args))
    with config_errors(args.parser):
        parallel = parallel_config(args)
    rank0 = os.environ.get("RANK", "0") == "0"  # under torchrun, rank 0 prints (and writes the run)
    if rank0:
        print("resolved config:\n" + json.dumps(resolved_config(model_cfg, train_cfg), indent=2))
    with flag_errors():
        result = train(model_cfg, train_cfg, args.out, resume=args.resume, progress=not args.no_progress,
                       parallel=parallel)
    if not rank0:
        return 0
    print(eval_table(result))
    print("experts per token by layer: " + " ".join(f"{k:.2f}" for k in result["experts_per_token_by_layer"]))
    print(f"next: moekit analyze {args.out} --out {args.out}/report   (HTML report of the routing)")
    return 0
