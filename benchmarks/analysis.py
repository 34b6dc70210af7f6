"""Routing-analysis benchmark: time `moekit.analysis.analyze` on a synthetic trace of 1,000,000

The benchmark lives in moekit.bench.analysis (so that `moekit bench analysis` works from an installed moekit);
this script runs it from a source checkout: `python benchmarks/analysis.py --help`.
"""

import sys

from moekit.bench.analysis import main

if __name__ == "__main__":
    sys.exit(main())
