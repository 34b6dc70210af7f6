"""The open-knowledge recipe (ROCKET, arXiv 2408.15915) on the embedded corpus, with bits per byte.

The benchmark lives in moekit.bench.open_knowledge (so that `moekit bench open_knowledge` works from an installed moekit);
this script runs it from a source checkout: `python benchmarks/open_knowledge.py --help`.
"""

import sys

from moekit.bench.open_knowledge import main

if __name__ == "__main__":
    sys.exit(main())
