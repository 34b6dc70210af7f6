"""moekit.bench: the benchmarks ship inside the package (`moekit bench` works from an installed wheel),
benchmarks/*.py are thin scripts, and every benchmark times with the one round-robin helper."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import setuptools

from moekit.bench import BENCHMARKS
from moekit.bench.timing import (
    append_json_lines,
    load_average,
    median_s,
    peak_rss_bytes,
    peak_rss_mb,
    reset_peak_rss,
    round_robin,
    status_bytes,
)
from moekit.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_bench_help_lists_every_benchmark(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    for name, what in BENCHMARKS.items():
        assert name in out and what.split()[0] in out


def test_every_benchmark_is_a_module_of_the_package_and_has_a_thin_script():
    packages = setuptools.find_packages(where=str(ROOT / "src"))  # what pyproject's packages.find ships
    assert {"moekit.bench", "moekit.cli"} <= set(packages)
    for name in BENCHMARKS:
        assert importlib.util.find_spec(f"moekit.bench.{name}") is not None, name
        script = (ROOT / "benchmarks" / f"{name}.py").read_text()
        assert f"from moekit.bench.{name} import main" in script and "perf_counter" not in script
    assert sorted(p.stem for p in (ROOT / "benchmarks").glob("*.py")) == sorted(BENCHMARKS)


def test_round_robin_interleaves_and_takes_a_steps_own_time():
    calls = []

    def step(name, own=None):
        def run():
            calls.append(name)
            return own
        return run

    flushes = []
    times = round_robin({"a": step("a"), "b": step("b", own=0.25)}, repeats=3, warmup=1,
                        before_each=lambda: flushes.append(len(calls)))
    assert calls == ["a", "b"] + ["a", "b"] * 3  # warm-up of each, then one run of each in turn
    assert flushes == [2, 3, 4, 5, 6, 7]  # before every timed run, not before warm-up
    assert times["b"] == [0.25] * 3 and all(0 <= t < 1 for t in times["a"])
    assert set(median_s({"x": lambda: None}, 3)) == {"x"}
    assert set(load_average()) == {"load_1m", "load_5m", "load_15m"} and peak_rss_mb() > 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self")
def test_peak_rss_can_be_reset_for_each_case():
    block = bytearray(256 * 2**20)  # touched: 256 MiB resident, then returned to the system
    high = peak_rss_bytes()
    del block
    reset_peak_rss()
    assert 0 < status_bytes("VmRSS") <= peak_rss_bytes() < high - 128 * 2**20
    assert status_bytes("NoSuchField") == -1


def test_results_are_appended_as_json_lines(tmp_path):
    out = tmp_path / "r.jsonl"
    append_json_lines(out, [{"bench": "a"}])
    append_json_lines(out, [{"bench": "b"}, {"bench": "c"}])
    assert out.read_text() == '{"bench": "a"}\n{"bench": "b"}\n{"bench": "c"}\n'


@pytest.mark.slow
def test_the_wheel_carries_the_benchmarks_and_runs_moekit_bench(tmp_path):
    """Build a wheel from a copy of the tree; `moekit bench` runs from the unpacked wheel alone."""
    src = tmp_path / "src-copy"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__",
                                                              "tests", "runs"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "whl"), str(src)], check=True, capture_output=True, timeout=600)
    wheel = next((tmp_path / "whl").glob("moekit-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"moekit/bench/{n}.py" for n in [*BENCHMARKS, "timing", "__init__"]} <= names
    assert {"moekit/cli/__init__.py", "moekit/cli/bench.py", "moekit/__main__.py"} <= names
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    run = subprocess.run([sys.executable, "-m", "moekit", "bench", "analysis", "--help"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "moekit bench analysis --quick" in run.stdout
    where = subprocess.run([sys.executable, "-c", "import moekit.bench; print(moekit.bench.__file__)"], cwd=tmp_path,
                           env=env, capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(tmp_path / "site"))
