"""`moekit compare --presets A,B,...`: train router families on equal terms and print one table;
`moekit compare --runs DIR1,DIR2,...`: evaluate existing runs (trained or compressed) on the same
validation windows and print the same table;
`moekit compare --merge DIR1,DIR2,...`: tabulate finished compare directories as one compare."""

from __future__ import annotations

import argparse
import dataclasses
import itertools

from moekit.cli import config_errors, late_arguments


def add_parser(subparsers) -> None:
    c = subparsers.add_parser("compare", help="train router families on equal terms and print one table")
    c.add_argument("--presets", default="topk,topp", help="comma-separated preset names (default topk,topp)")
    c.add_argument("--runs", default=None, metavar="DIR1,DIR2,...",
                   help="evaluate these existing runs (e.g. a run and its `moekit compress` results) on the same "
                        "validation windows instead of training presets; rows are named by the directories")
    c.add_argument("--out", default="runs/compare", help="output directory (default runs/compare)")
    c.add_argument("--sweep", action="append", metavar="SECTION.FIELD=V1,V2,...",
                   help="run each preset that has the field once per value (repeatable: a cartesian product), "
                        "e.g. router.p=0.2,0.3,0.4 and router.k=1,2,3")
    c.add_argument("--seeds", type=int, default=1,
                   help="replicates per setting with train seeds seed, seed+1, ... (default 1); compare.md gives "
                        "mean ± std and pareto.png the quality / experts trade-off")
    c.add_argument("--merge", default=None, metavar="DIR1,DIR2,...",
                   help="train nothing: tabulate the runs of these finished compare directories as one compare in "
                        "--out (a study trained in parts); no other flags")
    c.add_argument("--no-progress", action="store_true", help="no progress bar")

    def config_flags(parser, _argv):
        from moekit.cli.flags import add_config_flags

        add_config_flags(parser)  # applied to every preset

    late_arguments(c, config_flags)


def run(args) -> int:
    from moekit.cli.flags import apply_flags, flag_errors, parse_sweep
    from moekit.errors import UsageError
    from moekit.train.compare import compare, merge
    from moekit.train.presets import PRESETS, preset
    from moekit.train.trainer import resolve_configs

    if args.runs is not None and args.merge is not None:
        with config_errors(args.parser):
            raise UsageError("--runs evaluates existing runs, --merge tabulates finished compares: give one of them")
    if args.runs is not None:
        return _run_existing(args)
    if args.merge is not None:
        with config_errors(args.parser):
            given = [f"--{k}" for k, v in vars(args).items() if "." in k and v is not None]
            given += ["--sweep"] * bool(args.sweep) + ["--seeds"] * (args.seeds != 1)
            if given:
                raise UsageError(f"--merge tabulates finished runs as they were trained; it takes no {', '.join(given)}")
            merge([d for d in args.merge.split(",") if d], args.out)
        return 0
    names = args.presets.split(",")
    with config_errors(args.parser):
        parallel = sorted(k for k, v in vars(args).items() if k.startswith("parallel.") and v is not None)
        if parallel:
            raise UsageError(f"{', '.join('--' + k for k in parallel)}: compare trains in one process; launch "
                             "`torchrun ... -m moekit train --parallel.ep N` per run instead")
        unknown = [n for n in names if n not in PRESETS]
        if unknown:
            raise UsageError(f"--presets: unknown preset {', '.join(map(repr, unknown))}; allowed: "
                             f"{', '.join(sorted(PRESETS))}")
        base = {name: apply_flags(*preset(name), args) for name in names}
        if args.sweep or args.seeds != 1:
            variants, groups = sweep_variants(base, [parse_sweep(s) for s in args.sweep or []], args.seeds)
        else:
            variants, groups = {name: resolve_configs(*cfgs) for name, cfgs in base.items()}, None
    with flag_errors():  # e.g. a run in --out trained with other settings: named by their flags
        compare(variants, args.out, progress=not args.no_progress, groups=groups)
    return 0


def sweep_variants(base: dict, sweeps: list[tuple[str, list]] = (), seeds: int = 1) -> tuple[dict, dict[str, str]]:
    """Expand presets by swept fields and seeds: returns (variants, group of each variant).

    base: {preset name: (LMConfig, TrainConfig)} with the command line's other flags applied, not yet
        resolved. sweeps: [("SECTION.FIELD", values)] as `moekit.cli.flags.parse_sweep` returns; a sweep applies
        to every preset whose configs have the field (router fields: routers that have it).
    seeds: replicates per setting, with train seeds seed, seed + 1, ... .
    Names: `PRESET-FIELDVALUE...` for a group, `-sI` appended per seed when seeds > 1.
    Raises UsageError for seeds < 1, or a sweep no preset has a field for.
    """
    from moekit.cli.flags import applies_to, apply_flags
    from moekit.errors import UsageError
    from moekit.train.trainer import resolve_configs

    if not isinstance(seeds, int) or seeds < 1:
        raise UsageError(f"--seeds {seeds!r}: expected an integer >= 1")
    unused = [key for key, _ in sweeps if not any(applies_to(key, m) for m, _ in base.values())]
    if unused:
        raise UsageError(f"--sweep {', '.join(unused)}: no preset among {', '.join(base)} has this field")
    variants: dict = {}
    groups: dict[str, str] = {}
    for name, (model_cfg, train_cfg) in base.items():
        mine = [(key, values) for key, values in sweeps if applies_to(key, model_cfg)]
        for combo in itertools.product(*(values for _, values in mine)):
            setting = argparse.Namespace(**{key: v for (key, _), v in zip(mine, combo, strict=True)})
            m, t = apply_flags(model_cfg, train_cfg, setting)
            group = name + "".join(f"-{key.split('.', 1)[1]}{v}" for (key, _), v in zip(mine, combo, strict=True))
            for i in range(seeds):
                run = group if seeds == 1 else f"{group}-s{i}"
                variants[run] = resolve_configs(m, dataclasses.replace(t, seed=t.seed + i))
                groups[run] = group
    return variants, groups



def _run_existing(args) -> int:
    """--runs: evaluate existing runs; training flags do not apply to them."""
    from pathlib import Path

    from moekit.errors import UsageError
    from moekit.train.compare import compare_runs

    with config_errors(args.parser):
        given = sorted(k for k, v in vars(args).items() if "." in k and v is not None)
        if given or args.sweep or args.seeds != 1:
            raise UsageError(f"--runs evaluates existing runs; {', '.join(['--' + k for k in given] + (['--sweep'] if args.sweep else []) + (['--seeds'] if args.seeds != 1 else []))} "
                             "would change how runs are trained: drop them")
        dirs = [Path(d) for d in args.runs.split(",") if d]
        names = [d.name for d in dirs]
        if not dirs or len(set(names)) != len(names):
            raise UsageError(f"--runs {args.runs!r}: expected distinct run directories DIR1,DIR2,... (rows are named by "
                             "their last path component)")
        compare_runs(dict(zip(names, dirs, strict=True)), args.out)
    return 0
