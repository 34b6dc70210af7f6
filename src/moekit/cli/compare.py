"""`moekit compare --presets A,B,...`: train router families on equal terms and print one table."""

from __future__ import annotations

from moekit.cli import config_errors, late_arguments


def add_parser(subparsers) -> None:
    c = subparsers.add_parser("compare", help="train router families on equal terms and print one table")
    c.add_argument("--presets", default="topk,topp", help="comma-separated preset names (default topk,topp)")
    c.add_argument("--out", default="runs/compare", help="output directory (default runs/compare)")
    c.add_argument("--no-progress", action="store_true", help="no progress bar")

    def config_flags(parser, _argv):
        from moekit.cli.flags import add_config_flags

        add_config_flags(parser)  # applied to every preset

    late_arguments(c, config_flags)


def run(args) -> int:
    from moekit.cli.flags import apply_flags, flag_errors
    from moekit.errors import UsageError
    from moekit.train.compare import compare
    from moekit.train.presets import PRESETS, preset
    from moekit.train.trainer import resolve_configs

    names = args.presets.split(",")
    with config_errors(args.parser):
        unknown = [n for n in names if n not in PRESETS]
        if unknown:
            raise UsageError(f"--presets: unknown preset {', '.join(map(repr, unknown))}; allowed: "
                             f"{', '.join(sorted(PRESETS))}")
        variants = {name: resolve_configs(*apply_flags(*preset(name), args)) for name in names}
    with flag_errors():  # e.g. a run in --out trained with other settings: named by their flags
        compare(variants, args.out, progress=not args.no_progress)
    return 0
