"""MoLAE conversion (arXiv 2503.23100) of a trained moekit run: per rank, the reconstruction error of

The benchmark lives in moekit.bench.molae (so that `moekit bench molae` works from an installed moekit);
this script runs it from a source checkout: `python benchmarks/molae.py --help`.
"""

import sys

from moekit.bench.molae import main

if __name__ == "__main__":
    sys.exit(main())
