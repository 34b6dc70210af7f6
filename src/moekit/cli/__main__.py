"""`python -m moekit.cli ARGS`: the `moekit` command."""

import sys

from moekit.cli import main

sys.exit(main())
