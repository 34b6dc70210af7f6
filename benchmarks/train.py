"""Training throughput of the `tiny` preset against transformers' OlmoeForCausalLM of the same shape.

The benchmark lives in moekit.bench.train (so that `moekit bench train` works from an installed moekit);
this script runs it from a source checkout: `python benchmarks/train.py --help`.
"""

import sys

from moekit.bench.train import main

if __name__ == "__main__":
    sys.exit(main())
