"""Cross-rank bytes a placement saves, on routing traces (moekit.dispatch.placement.placement_report).

The benchmark lives in moekit.bench.ep_placement (so that `moekit bench ep_placement` works from an installed moekit);
this script runs it from a source checkout: `python benchmarks/ep_placement.py --help`.
"""

import sys

from moekit.bench.ep_placement import main

if __name__ == "__main__":
    sys.exit(main())
