"""`moekit` command line: `moekit info`, `moekit bench NAME [ARGS]`."""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path

import torch

import moekit
from moekit.ops.grouped import compute_dtype, cpu_has_native_low_precision, grouped_mm_available

BENCHMARKS = ("layer",)


def _info(_args) -> int:
    print(f"moekit {moekit.__version__}, torch {torch.__version__}")
    print(f"routers: {', '.join(moekit.registered_routers())}")
    print(f"grouped GEMM kernel (torch._grouped_mm): {'yes' if grouped_mm_available() else 'no (loop fallback)'}")
    native = cpu_has_native_low_precision()
    print(f"CPU bf16 instructions: {'yes' if native else 'no'}; bf16 expert GEMMs on CPU run in "
          f"{str(compute_dtype(torch.bfloat16, torch.device('cpu'))).replace('torch.', '')}")
    print(f"CUDA available: {torch.cuda.is_available()}")
    return 0


def _bench(args) -> int:
    script = Path(__file__).resolve().parents[2] / "benchmarks" / f"{args.name}.py"
    if not script.is_file():
        print(f"moekit bench: {script} not found; benchmarks run from a source checkout of moekit", file=sys.stderr)
        return 2
    sys.argv = [str(script), *args.rest]
    runpy.run_path(str(script), run_name="__main__")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moekit", description="Mixture-of-Experts models with dynamic routing.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, routers and compute backends").set_defaults(func=_info)
    b = sub.add_parser("bench", help="run a benchmark script (prints JSON lines)")
    b.add_argument("name", choices=BENCHMARKS)
    b.add_argument("rest", nargs=argparse.REMAINDER, help="arguments passed to the benchmark, e.g. --quick")
    b.set_defaults(func=_bench)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
