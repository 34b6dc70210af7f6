"""Offloaded inference benchmark: decode speed, hit rates and bytes moved under expert budgets.

The benchmark lives in moekit.bench.offload (so that `moekit bench offload` works from an installed moekit);
this script runs it from a source checkout: `python benchmarks/offload.py --help`.
"""

import sys

from moekit.bench.offload import main

if __name__ == "__main__":
    sys.exit(main())
