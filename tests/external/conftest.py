# The stand-in modules under shims/ are copied into the external-test cache by fetch_tests.py; they hold no tests.
collect_ignore = ["shims"]
