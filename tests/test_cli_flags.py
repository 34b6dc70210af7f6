"""The generated `--SECTION.FIELD` flags: a help text from the field's metadata for every one, choices
for enumerations, the chosen preset's value shown, and config errors through parser.error: one line,
`moekit COMMAND: ...`, exit code 2, nothing written."""

from __future__ import annotations

import dataclasses

import pytest

from moekit.cli import build_parser, main
from moekit.cli.flags import SECTIONS, config_flag_fields
from moekit.config import ACTIVATIONS, BACKENDS, BALANCE_SCOPES, router_config_class
from moekit.routers import registered_routers
from moekit.routers.random import SCHEDULES
from moekit.routers.recurrent import SELECT_RULES
from moekit.routers.topk import SCORES
from moekit.train.presets import preset
from moekit.train.trainer import TOKENIZERS


def _flags(argv: list[str]) -> dict:
    """--flag -> argparse action of the subcommand named first in argv."""
    parser = build_parser(argv)
    command = next(a for a in parser._actions if a.dest == "command").choices[argv[0]]
    return {a.option_strings[0]: a for a in command._actions if a.option_strings}


def test_every_config_field_behind_a_flag_has_a_help_text():
    # every router's own fields (the help shown when that router is the preset's) and the other sections'
    missing = [f"{cls.__name__}.{f.name}" for kind in registered_routers()
               for cls in [router_config_class(kind)] for f in dataclasses.fields(cls)
               if not f.metadata.get("help")]
    missing += [f"{section}.{f.name}" for section, f in config_flag_fields() if not f.metadata.get("help")]
    assert not missing, "fields without setting(..., help): " + ", ".join(missing)


@pytest.mark.parametrize(("command", "router"), [(["train"], preset("tiny")[0].moe.router),
                                                 (["train", "--preset", "deepseek"], preset("deepseek")[0].moe.router),
                                                 (["compare"], None)])
def test_every_generated_flag_shows_its_help(command, router):
    flags = {k: a for k, a in _flags(command).items() if "." in k}
    assert len(flags) == sum(1 for _ in config_flag_fields())
    for section, f in config_flag_fields(router):
        text = flags[f"--{section}.{f.name}"].help
        assert text.startswith(f.metadata["help"].replace("%", "%%")) and text.endswith(")"), (section, f.name)


def test_enumerations_have_choices():
    flags = _flags(["train"])
    expected = {"--router.kind": registered_routers(), "--moe.activation": ACTIVATIONS, "--moe.backend": BACKENDS,
                "--moe.balance_scope": BALANCE_SCOPES, "--train.tokenizer": TOKENIZERS, "--router.score": SCORES,
                "--router.select_rule": SELECT_RULES, "--router.k_schedule": SCHEDULES}
    for flag, values in expected.items():
        assert list(flags[flag].choices) == list(values), flag
    assert flags["--router.k"].choices is None  # an integer, no enumeration


@pytest.mark.parametrize("name", ["topk", "deepseek", "remoe"])
def test_help_shows_the_chosen_presets_value(name):
    model_cfg, train_cfg = preset(name)
    flags = _flags(["train", "--preset", name])
    assert flags["--moe.num_experts"].help.endswith(f"(preset {name}: {model_cfg.moe.num_experts})")
    assert flags["--train.lr"].help.endswith(f"(preset {name}: {train_cfg.lr!r})")
    assert flags["--router.kind"].help.endswith(f"(preset {name}: {model_cfg.moe.router.kind!r})")
    assert flags["--router.gru_dim"].help.endswith(f"router kinds recurrent; not a field of the preset's router "
                                                   f"kind {model_cfg.moe.router.kind!r})")
    # the router field's help is the preset's router's own (k means a target average for ReMoE)
    k_help = dataclasses.fields(type(model_cfg.moe.router))
    assert flags["--router.k"].help.startswith(next(f for f in k_help if f.name == "k").metadata["help"])
    assert _flags(["compare"])["--train.lr"].help.endswith("(default: each preset's own value)")


TINY = ["--model.d_model", "32", "--model.n_layers", "2", "--model.n_heads", "2", "--moe.d_expert", "32",
        "--train.steps", "1", "--no-progress"]

# (argv, the one line on stderr): errors of the command line (argparse) and of the resolved config
BAD = [
    (["train", "--router.p", "2"], "moekit train: --router.p 2.0 is invalid; allowed: a float in (0, 1]"),
    (["train", "--preset", "topk", "--router.p", "0.3"],
     "moekit train: --router.p does not apply to router kind 'topk'"),
    (["train", "--train.seq_len", "4096"], "moekit train: --train.seq_len 4096 is invalid; allowed: an integer in "
                                           "[1, 512] (at most --model.max_seq_len)"),
    (["train", "--moe.num_experts", "0"], "moekit train: --moe.num_experts 0 is invalid; allowed: an integer >= 1"),
    (["train", "--train.lr", "inf"], "moekit train: --train.lr inf is invalid; allowed: a finite number"),
    (["train", "--train.lr", "fast"], "moekit train: argument --train.lr: --train.lr: expected float, got 'fast'"),
    (["train", "--moe.activation", "tanh"], "moekit train: argument --moe.activation: invalid choice: 'tanh'"),
    (["train", "--router.kind", "nope"], "moekit train: argument --router.kind: invalid choice: 'nope'"),
    (["compare", "--presets", "topk,nope"], "moekit compare: --presets: unknown preset 'nope'; allowed: "),
    (["compare", "--moe.num_experts", "0"], "moekit compare: --moe.num_experts 0 is invalid"),
]


@pytest.mark.parametrize(("argv", "line"), BAD, ids=[" ".join(a) for a, _ in BAD])
def test_config_errors_are_one_line_with_exit_code_2(argv, line, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MOEKIT_DEBUG", raising=False)  # (with it, the error is raised for its traceback)
    out = tmp_path / "run"
    try:
        code = main([*argv, "--out", str(out), *TINY])
    except SystemExit as e:  # argparse's own errors end the parse
        code = e.code
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith(line), err
    assert not out.exists()


def test_sections_name_the_config_classes():
    assert {cls.__name__ for cls, _ in SECTIONS.values()} == {"LMConfig", "MoEConfig", "RouterConfig", "TrainConfig",
                                                             "ParallelConfig"}
