"""MoE layer speed against a dense FFN of the same active FLOPs and against transformers.

The benchmark lives in moekit.bench.layer (so that `moekit bench layer` works from an installed moekit);
this script runs it from a source checkout: `python benchmarks/layer.py --help`.
"""

import sys

from moekit.bench.layer import main

if __name__ == "__main__":
    sys.exit(main())
