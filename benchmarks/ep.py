"""Expert parallelism on CPU with gloo: step time and all-to-all traffic per EP size (1, 2, 4).

The benchmark lives in moekit.bench.ep (so that `moekit bench ep` works from an installed moekit);
this script runs it from a source checkout: `python benchmarks/ep.py --help`.
"""

import sys

from moekit.bench.ep import main

if __name__ == "__main__":
    sys.exit(main())
