"""Offloaded decoding of the runs of `moekit compare` (docs/results/architectures.md): one JSON line per

The benchmark lives in moekit.bench.architectures (so that `moekit bench architectures` works from an installed moekit);
this script runs it from a source checkout: `python benchmarks/architectures.py --help`.
"""

import sys

from moekit.bench.architectures import main

if __name__ == "__main__":
    sys.exit(main())
