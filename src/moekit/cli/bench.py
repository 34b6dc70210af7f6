"""`moekit bench NAME [ARGS]`: run one of moekit's benchmarks (moekit.bench; JSON lines out)."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    from moekit.bench import BENCHMARKS

    b = subparsers.add_parser("bench", help="run a benchmark (prints JSON lines)",
                              description="Run one of moekit's benchmarks; `moekit bench NAME --help` for its "
                                          "arguments.\n\n" + "\n".join(f"  {n:<10} {what}" for n, what in
                                                                       BENCHMARKS.items()),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("name", choices=list(BENCHMARKS), help="the benchmark")
    b.add_argument("rest", nargs=argparse.REMAINDER, help="arguments passed to the benchmark, e.g. --quick")


def run(args) -> int:
    from moekit.bench import run as run_benchmark

    return run_benchmark(args.name, args.rest)
