"""benchmarks/train.py: reachable as `moekit bench train`, and a tiny end-to-end run (slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moekit.cli import main

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "train.py"  # the thin script


def test_moekit_bench_train_is_a_choice(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "train", "--help"])
    assert exit_.value.code == 0
    assert "ratio_hf" in capsys.readouterr().out


@pytest.mark.slow
def test_tiny_run_prints_one_line_per_implementation_and_the_ratio():
    env = {**os.environ, "PYTHONPATH": str(SCRIPT.parents[1] / "src")}
    out = subprocess.run([sys.executable, str(SCRIPT), "--impls", "moekit_topk,moekit_tiny,hf_eager,hf_nonexistent",
                          "--batch", "1", "--seq-len", "16", "--warmup", "1", "--repeats", "2", "--threads", "1"],
                         capture_output=True, text=True, env=env, timeout=600, check=True).stdout
    lines = [json.loads(line) for line in out.splitlines()]
    by_impl = {x["impl"]: x for x in lines if x["bench"] == "train"}
    assert set(by_impl) == {"moekit_topk", "moekit_tiny", "hf_eager"}
    assert all(x["tokens_per_s"] > 0 and x["peak_rss_mb"] > 100 for x in by_impl.values())
    summary = lines[-1]
    assert summary["bench"] == "train_summary" and "hf_nonexistent" in summary["skipped"]
    assert summary["ratio_hf"] == pytest.approx(by_impl["moekit_topk"]["tokens_per_s"] / by_impl["hf_eager"]["tokens_per_s"],
                                                rel=1e-2)
    assert set(summary["load_before"]) == {"load_1m", "load_5m", "load_15m"}
