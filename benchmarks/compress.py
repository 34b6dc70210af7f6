"""Compression benchmark: what pruning, merging and quantising the experts cost in quality and save in bytes.

The benchmark lives in moekit.bench.compress (so that `moekit bench compress` works from an installed moekit);
this script runs it from a source checkout: `python benchmarks/compress.py --help`.
"""

import sys

from moekit.bench.compress import main

if __name__ == "__main__":
    sys.exit(main())
