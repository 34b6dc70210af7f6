"""`python -m moekit ...` (and `torchrun ... -m moekit train ...`): the command line."""

from moekit.cli import main

raise SystemExit(main())
