"""Composition of Experts (arXiv 2412.01868) over LoRA variants of one base, with bits per byte.

The benchmark lives in moekit.bench.composition (so that `moekit bench composition` works from an installed moekit);
this script runs it from a source checkout: `python benchmarks/composition.py --help`.
"""

import sys

from moekit.bench.composition import main

if __name__ == "__main__":
    sys.exit(main())
