"""transformers' own model tests on wrapped models (slow; needs the cache that fetch_tests.py fills).

For each family in known_wrapped_failures.json, the family's model tests run unwrapped and wrapped (run_external.py)
and every test that fails only when wrapped must be one listed there with its diagnosis: a new wrapped-only failure
fails this test, and a listed failure that no longer happens is reported so the list can shrink.
"""

from __future__ import annotations

import json
import pathlib
import sys

import pytest

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from fetch_tests import default_cache  # noqa: E402
from run_external import run_family  # noqa: E402

KNOWN = json.loads((HERE / "known_wrapped_failures.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(KNOWN["families"]))
def test_wrapped_only_failures_are_the_known_ones(family):
    cache = default_cache()
    if not (cache / "tests" / "models" / family).is_dir():
        pytest.skip(f"transformers' tests are not in {cache}: run tests/external/fetch_tests.py first (see "
                    "tests/external/README.md)")
    override = KNOWN.get("override", "")
    plain = run_family(cache, family, False, None, 3600, override)["tests"]
    wrapped = run_family(cache, family, True, None, 3600, override)["tests"]
    only = {t for t, (s, _) in plain.items() if s == "passed" and wrapped.get(t, ("", ""))[0] == "failed"}
    known = set(KNOWN["families"][family])
    assert only <= known, f"new wrapped-only failures in {family}: {sorted(only - known)}"
    if known - only:
        print(f"{family}: listed wrapped-only failures that now pass: {sorted(known - only)}")
