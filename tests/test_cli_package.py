"""moekit.cli as a package: the subcommand registry, lazy imports (`moekit --help` imports neither
torch nor transformers) and the two ways to start it (`python -m moekit`, the `moekit` console script)."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import tomllib
import types
from pathlib import Path

import pytest

import moekit.cli
from moekit.cli import COMMANDS, build_parser, main

ROOT = Path(__file__).resolve().parents[1]


def _commands(argv: list[str]) -> dict:
    """name -> subcommand parser of `build_parser(argv)`."""
    parser = build_parser(argv)
    return next(a for a in parser._actions if a.dest == "command").choices


def _imported_by(*args: str) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Run `python -X importtime -m moekit ARGS` on this tree; (the process, top-level packages it imported)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "moekit", *args], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=120)
    # importtime lines: "import time: self [us] | cumulative | imported package" (nesting by indentation)
    names = {line.rsplit("|", 1)[1].strip().split(".")[0] for line in proc.stderr.splitlines()
             if line.startswith("import time:") and "|" in line}
    return proc, names


@pytest.mark.parametrize("args", [["--help"], ["bench", "--help"], ["eval", "--help"], ["analyze", "--help"],
                                  ["export", "--help"], ["offload", "--help"], ["info", "--help"]])
def test_help_imports_neither_torch_nor_transformers(args):
    proc, names = _imported_by(*args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "moekit" in names and "argparse" in names  # the measurement sees moekit's own imports
    assert "torch" not in names and "transformers" not in names, sorted(names)


def test_top_level_help_lists_every_registered_command():
    proc, _ = _imported_by("--help")
    listed = proc.stdout
    commands = _commands([])
    for path in COMMANDS:
        module = importlib.import_module(path)
        names = [n for n, p in commands.items() if p.get_default("func") is module.run]
        assert names, f"{path} added no subcommand"
        assert all(f"    {n} " in listed for n in names)


def test_every_command_module_is_cheap_and_complete():
    for path in COMMANDS:
        module = importlib.import_module(path)
        assert callable(module.add_parser) and callable(module.run), path


def test_a_command_module_is_registered_with_one_line(monkeypatch, capsys):
    """A package's own `cli.py` (as moekit.cli.compose is) joins with its module path in COMMANDS."""
    hello = types.ModuleType("moekit_test_hello_cli")

    def add_parser(subparsers):
        p = subparsers.add_parser("hello", help="say hello")
        p.add_argument("--times", type=int, default=1, help="how often")

    def run(args):
        print("hello " * args.times)
        return 7

    hello.add_parser, hello.run = add_parser, run
    monkeypatch.setitem(sys.modules, hello.__name__, hello)
    monkeypatch.setattr(moekit.cli, "COMMANDS", (*COMMANDS, hello.__name__))
    assert main(["hello", "--times", "2"]) == 7
    assert capsys.readouterr().out == "hello hello \n"
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "say hello" in capsys.readouterr().out


def test_late_arguments_are_added_for_the_chosen_command_only():
    train = _commands(["train", "--preset", "topk"])["train"]
    assert any(a.dest == "router.kind" for a in train._actions)
    untouched = _commands(["eval"])["train"]
    assert not any(a.dest == "router.kind" for a in untouched._actions)


def test_python_dash_m_moekit_and_the_console_script_entry_point():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, name = scripts["moekit"].partition(":")
    assert getattr(importlib.import_module(module), name) is main
    proc, _ = _imported_by("no-such-command")
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[-1].startswith("moekit: argument COMMAND: invalid choice: 'no-such-command'")
