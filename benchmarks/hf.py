"""Whole-model CPU speed of moekit.hf-wrapped transformers MoE models against transformers itself.

The benchmark lives in moekit.bench.hf (so that `moekit bench hf` works from an installed moekit);
this script runs it from a source checkout: `python benchmarks/hf.py --help`.
"""

import sys

from moekit.bench.hf import main

if __name__ == "__main__":
    sys.exit(main())
