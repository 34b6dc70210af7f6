"""`moekit` command line: one module per subcommand, registered in COMMANDS.

  moekit info                          versions, routers, compute backends
  moekit train [--preset NAME] [--out RUN] [--resume] [--SECTION.FIELD VALUE ...]
  moekit eval RUN                      validation loss / bits per byte, overall and per domain
  moekit generate RUN --prompt TEXT    greedy, temperature or top-p sampling with a KV cache
  moekit compare --presets A,B,...     equal-terms training of router families, one table
  moekit export RUN --to hf DIR        a transformers checkpoint with the identical routing rule
  moekit analyze RUN|--hf DIR|TRACE    routing metrics and an HTML report
  moekit offload RUN|--hf DIR OUT      write an expert store for `generate --expert-budget`
  moekit compress RUN --out DIR ...    prune, merge, quantise a run's experts
  moekit compose build|eval|serve      Composition of Experts: route requests to whole models
  moekit bench NAME [ARGS]             a benchmark (JSON lines)

A subcommand is a module with `add_parser(subparsers)` (adds its parser; cheap: torch and transformers
are imported inside `run`, or in arguments added with `late_arguments`) and `run(args) -> int`; it is
registered with one line in COMMANDS. Building the parser imports no torch, so `moekit --help` answers
at once; only the chosen subcommand's late arguments are added (`moekit train --help` shows the
flags with the chosen preset's values).

Every mistake ends in one line, `moekit COMMAND: message`, with exit code 2 for a usage error (a bad
flag, argument, config value or path: through `parser.error`) and 1 for a failure (a damaged file, a
full disk); Ctrl-C exits with 130. MOEKIT_DEBUG=1 shows the traceback instead.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import json
import os
import re
import sys
from collections.abc import Callable
from contextlib import contextmanager

from moekit.errors import MoekitError, UsageError

# The subcommands, in the order `moekit --help` lists them: one module each (add_parser, run).
COMMANDS = (
    "moekit.cli.info",
    "moekit.cli.train",
    "moekit.cli.evaluate",
    "moekit.cli.generate",
    "moekit.cli.export",
    "moekit.cli.analyze",
    "moekit.cli.compare",
    "moekit.cli.offload",
    "moekit.cli.compress",
    "moekit.cli.compose",
    "moekit.cli.bench",
)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, `moekit COMMAND: message`, exit code 2."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.dash_value_options: set[str] = set()  # `takes_dash_values`

    def error(self, message: str):
        self.exit(2, _one_line(message if message.startswith(self.prog) else f"{self.prog}: {message}") + "\n")

    def parse_known_args(self, args=None, namespace=None):
        if args is not None and self.dash_value_options:
            args = _join_dash_values(list(args), self.dash_value_options, self._dash_value_spelling)
        return super().parse_known_args(args, namespace)

    def _dash_value_spelling(self, arg: str) -> str | None:
        """The option of `dash_value_options` that `arg` names: itself, or the one option it abbreviates as argparse
        resolves it (allow_abbrev: a prefix of exactly one option string), else None."""
        if arg in self.dash_value_options:
            return arg
        if not (self.allow_abbrev and arg.startswith("--") and len(arg) > 2) or arg in self._option_string_actions:
            return None
        matches = {self._option_string_actions[o] for o in self._option_string_actions if o.startswith(arg)}
        if len(matches) != 1:
            return None
        (action,) = matches
        return next((o for o in action.option_strings if o in self.dash_value_options), None)


def takes_dash_values(parser: argparse.ArgumentParser, *option_strings: str) -> None:
    """Let these options of `parser` (a Parser) take a value that reads as a negative number (a dash and a digit,
    a dot, 'inf' or 'nan', any case): `--expert-budget -5%` reads as `--expert-budget=-5%` (argparse would take
    '-5%' or '-inf' for an unknown option and say the flag is missing its argument), so that the value's own
    check names what is wrong with it."""
    parser.dash_value_options.update(option_strings)


_DASH_VALUE = re.compile(r"-(?:[0-9.]|inf|nan)", re.IGNORECASE)


def _join_dash_values(args: list[str], options: set[str], spelling=None) -> list[str]:
    """`spelling(arg)`: the option of `options` that arg names (an abbreviation argparse accepts, e.g.
    `--expert-bud`), else None; by default only the options themselves."""
    out: list[str] = []
    i = 0
    while i < len(args):
        if args[i] == "--":
            return out + args[i:]
        option = spelling(args[i]) if spelling is not None else (args[i] if args[i] in options else None)
        if option is not None and i + 1 < len(args) and _DASH_VALUE.match(args[i + 1]):
            out.append(f"{option}={args[i + 1]}")
            i += 2
        else:
            out.append(args[i])
            i += 1
    return out


def late_arguments(parser: argparse.ArgumentParser, add: Callable[[argparse.ArgumentParser, list[str]], None]) -> None:
    """Have `add(parser, argv)` add arguments only when this subcommand is the one on the command line
    (argv: the words after its name), for arguments whose building imports torch (config flags)."""
    parser.set_defaults(late_arguments=add)


def _debug() -> bool:
    return os.environ.get("MOEKIT_DEBUG", "") not in ("", "0")


@contextmanager
def config_errors(parser: argparse.ArgumentParser):
    """A config error (UsageError) in the block goes through `parser.error`: one line naming the flag, exit 2
    (with MOEKIT_DEBUG=1 it is raised, flags named, for its traceback)."""
    from moekit.cli.flags import flag_names

    try:
        yield
    except UsageError as e:
        if _debug():
            raise UsageError(flag_names(str(e))) from e
        parser.error(flag_names(str(e)))


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The `moekit` parser; the late arguments of the subcommand named in `argv` (sys.argv[1:] if None) added."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = Parser(prog="moekit", description="Mixture-of-Experts models with dynamic routing.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for path in COMMANDS:
        module = importlib.import_module(path)
        before = set(sub.choices)
        module.add_parser(sub)
        for name in set(sub.choices) - before:
            sub.choices[name].set_defaults(func=module.run, parser=sub.choices[name])
    chosen = next((i for i, word in enumerate(argv) if not word.startswith("-")), None)
    if chosen is not None and argv[chosen] in sub.choices:
        command = sub.choices[argv[chosen]]
        add = command.get_default("late_arguments")
        if add is not None:
            add(command, argv[chosen + 1:])
    return parser


def _one_line(e: BaseException | str) -> str:
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
    """Run one command; every error a user can cause ends as one line on stderr (see the module doc).
    An error in the command line itself raises SystemExit(2) after printing its line, as argparse does;
    errors found once the command runs (config errors through `parser.error` included) return the exit code."""
    args = build_parser(argv).parse_args(argv)
    debug = _debug()
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
        if e.code == 2:  # parser.error (a config error) has printed its line
            return 2
        raise
    except _USER_ERRORS as e:
        if debug:
            raise
        msg = _one_line(e)
        print(msg if msg.startswith(f"moekit {args.command}") else f"moekit {args.command}: {msg}", file=sys.stderr)
        return _exit_code(e)
