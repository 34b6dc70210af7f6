"""Run transformers' model tests per family unwrapped and wrapped (moekit.hf.wrap on every model); compare.

    PYTHONPATH=src python tests/external/run_external.py [FAMILY ...] [--out report.json] [-k EXPR]

Needs the cache that fetch_tests.py fills (offline from then on). Each family runs twice in a fresh pytest
process (its cache conftest loads moekit_wrap_plugin; the second run adds --moekit-wrap), each test is matched by
id across the two runs, and the report gives per family the passed / failed / skipped counts of both runs and
every test that fails only when wrapped, with the first line of its failure. A wrapped run that wrapped nothing
is an error (the hook did not intercept). Exit status: 0, or 1 when any family has wrapped-only failures.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from fetch_tests import FAMILIES, default_cache  # noqa: E402


def run_family(cache: pathlib.Path, family: str, wrapped: bool, keyword: str | None, timeout: int,
               override: str = "", junit_dir: pathlib.Path | None = None) -> dict:
    """{test id: (status, message)} of one pytest run, plus the plugin's counts when wrapped; with `junit_dir`,
    the run's JUnit XML (full failure texts, per-test times) is kept there as <family>-<wrapped|unwrapped>.xml."""
    test_file = cache / "tests" / "models" / family / f"test_modeling_{family}.py"
    if not test_file.exists():
        raise FileNotFoundError(f"{test_file} is missing; run tests/external/fetch_tests.py first")
    with tempfile.TemporaryDirectory() as tmp:
        junit, stats = pathlib.Path(tmp, "junit.xml"), pathlib.Path(tmp, "stats.json")
        cmd = [sys.executable, "-m", "pytest", str(test_file), "-c", str(cache / "pytest.ini"), "--rootdir",
               str(cache), "--import-mode=prepend", "-q", "-p", "no:randomly", f"--junitxml={junit}"]
        cmd += ["--moekit-wrap"] if wrapped else []
        cmd += ["-k", keyword] if keyword else []
        cmd += [f"--moekit-config-override={override}"] if override else []
        src = HERE.parent.parent / "src"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), str(HERE), str(cache / "site")]),
               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "",
               "MOEKIT_WRAP_STATS": str(stats)}
        env.pop("RUN_SLOW", None)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=cache)
        if not junit.exists():
            raise RuntimeError(f"pytest produced no report for {family} (exit {proc.returncode}):\n"
                               f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        results = parse_junit(junit)
        counts = json.loads(stats.read_text()) if stats.exists() else None
        if junit_dir is not None:
            junit_dir.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(junit, junit_dir / f"{family}-{'wrapped' if wrapped else 'unwrapped'}.xml")
    if wrapped and (counts is None or counts["wrapped"] + counts["refused"] == 0):
        raise RuntimeError(f"the wrapped run of {family} wrapped no model: the moekit hook did not intercept "
                           f"construction (plugin counts: {counts})")
    return {"tests": results, "plugin": counts}


def parse_junit(path: pathlib.Path) -> dict[str, tuple[str, str]]:
    out = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        test_id = f"{case.get('classname', '').rpartition('.')[2]}::{case.get('name')}"
        status, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                status = "skipped" if tag == "skipped" else "failed"
                message = (node.get("message") or node.text or "").strip().splitlines()[0:1]
                message = message[0][:300] if message else ""
                break
        out[test_id] = (status, message)
    return out


def counts(results: dict[str, tuple[str, str]]) -> dict[str, int]:
    c = {"passed": 0, "failed": 0, "skipped": 0}
    for status, _ in results.values():
        c[status] += 1
    return c


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("families", nargs="*", default=list(FAMILIES))
    ap.add_argument("--cache", type=pathlib.Path, default=None)
    ap.add_argument("--out", type=pathlib.Path, default=None, help="write the full report as JSON")
    ap.add_argument("-k", dest="keyword", default=None, help="pytest -k expression (both runs)")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per pytest run")
    ap.add_argument("--override", default="", help="--moekit-config-override for both runs (diagnostic variant)")
    ap.add_argument("--junit-dir", type=pathlib.Path, default=None, help="keep each run's JUnit XML here")
    ap.add_argument("--reuse-unwrapped", action="store_true",
                    help="take a family's unwrapped results from <junit-dir>/<family>-unwrapped.xml when it exists "
                         "(moekit changes cannot move them; same -k and --override assumed)")
    args = ap.parse_args(argv)
    if args.reuse_unwrapped and args.junit_dir is None:
        ap.error("--reuse-unwrapped needs --junit-dir")
    cache = args.cache or default_cache()
    report, any_wrapped_only = {}, False
    print(f"{'family':<13} {'unwrapped p/f/s':<17} {'wrapped p/f/s':<15} wrapped-only failures")
    for family in args.families:
        kept = args.junit_dir / f"{family}-unwrapped.xml" if args.reuse_unwrapped and args.junit_dir else None
        if kept is not None and kept.exists():
            plain = {"tests": parse_junit(kept), "plugin": None}
        else:
            plain = run_family(cache, family, False, args.keyword, args.timeout, args.override, args.junit_dir)
        wrapped = run_family(cache, family, True, args.keyword, args.timeout, args.override, args.junit_dir)
        only = {t: wrapped["tests"][t][1] for t, (s, _) in plain["tests"].items()
                if s == "passed" and wrapped["tests"].get(t, ("missing", ""))[0] == "failed"}
        fixed = sorted(t for t, (s, _) in plain["tests"].items()
                       if s == "failed" and wrapped["tests"].get(t, ("", ""))[0] == "passed")
        any_wrapped_only |= bool(only)
        cp, cw = counts(plain["tests"]), counts(wrapped["tests"])
        print(f"{family:<13} {cp['passed']}/{cp['failed']}/{cp['skipped']:<11} "
              f"{cw['passed']}/{cw['failed']}/{cw['skipped']:<9} {len(only)}", flush=True)
        for msg, n in collections.Counter(only.values()).most_common():  # one line per cause; the tests in --out
            print(f"    {n} x {msg}")
        report[family] = {"unwrapped": cp, "wrapped": cw, "plugin": wrapped["plugin"], "wrapped_only": only,
                          "unwrapped_only": fixed,
                          "both_failed": sorted(t for t, (s, _) in plain["tests"].items()
                                                if s == "failed" and wrapped["tests"].get(t, ("", ""))[0] == "failed"),
                          "unwrapped_failures": {t: m for t, (s, m) in plain["tests"].items() if s == "failed"}}
        if args.out:  # after every family, so that a long run keeps what it has
            args.out.write_text(json.dumps(report, indent=1))
    return 1 if any_wrapped_only else 0


if __name__ == "__main__":
    sys.exit(main())
