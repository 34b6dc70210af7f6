"""Ctrl-C in `moekit analyze` cancels the queued work and ends at once (issue 12 item 5), leaving no
output directory and no temporary one. Today the process pool finishes every queued task first."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import threading
import time

import numpy as np
import pytest

from moekit.analysis import RoutingTrace, save_trace
from moekit.analysis.report import AnalysisConfig, compute_metrics

from .io_support import moekit_subprocess


def long_trace(seed: int = 0) -> RoutingTrace:
    """A trace whose full analysis takes tens of seconds (16 x 512 tokens, L = 4, E = 32)."""
    rng = np.random.default_rng(seed)
    return RoutingTrace([np.argsort(rng.random((4, 512, 32)), axis=2)[:, :, :2] for _ in range(16)], 32)


class CountingBar:
    """Stands in for tqdm: counts the tasks the analysis reports finished."""

    finished = 0

    def __init__(self, total, **_):
        self.total = total

    def update(self, n=1):
        CountingBar.finished += n

    def close(self):
        pass


def test_sigint_terminates_the_workers_and_cancels_queued_tasks(monkeypatch):
    import tqdm.auto

    import moekit.analysis.report.tasks as report

    started = threading.Event()
    make_pool = report._pool

    def pool(workers, trace):
        p = make_pool(workers, trace)
        started.set()
        return p

    def interrupt_soon():
        started.wait(30)
        time.sleep(0.5)  # the workers are busy with the first (longest) tasks, most are still queued
        os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(report, "_pool", pool)
    monkeypatch.setattr(tqdm.auto, "tqdm", CountingBar)
    CountingBar.finished = 0
    threading.Thread(target=interrupt_soon, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        compute_metrics(long_trace(), AnalysisConfig(workers=2), progress=True)
    assert started.is_set()
    assert multiprocessing.active_children() == []  # terminated and joined: no task runs on
    time.sleep(0.2)  # a result arriving late would still be counted
    assert CountingBar.finished < 10, f"{CountingBar.finished} of 27 tasks finished: the queue was not cancelled"


def test_ctrl_c_in_moekit_analyze_exits_130_within_seconds(tmp_path):
    """The real command: SIGINT while two workers run; exit code 130, nothing left on disk. Uninterrupted,
    this analysis takes about 30 s here; interrupted it ended 0.15-0.2 s after SIGINT (a generous 10 s
    timeout, for loaded machines). In the default suite although it takes a few seconds (the child's
    imports): it is the only check of the `moekit` command's own exit path."""
    path = save_trace(long_trace(), tmp_path / "t.npz")
    out = tmp_path / "rep"
    p = moekit_subprocess(["analyze", str(path), "--out", str(out), "--workers", "2"],
                          stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    seen = ""
    while "analysing routing" not in seen:  # the progress bar: the pool is up and the tasks are queued
        ch = p.stderr.read(1)
        assert ch, f"moekit analyze ended before starting its workers: {seen}"
        seen += ch
    time.sleep(1.0)
    p.send_signal(signal.SIGINT)
    t0 = time.perf_counter()
    try:
        p.wait(timeout=10)
    except subprocess.TimeoutExpired:
        p.kill()
        pytest.fail("moekit analyze was still running 10 s after Ctrl-C")
    elapsed = time.perf_counter() - t0
    err = p.stderr.read()
    assert p.returncode == 130, err
    assert "Traceback" not in err
    assert sorted(x.name for x in tmp_path.iterdir()) == ["t.npz"], "no report and no temporary directory"
    print(f"exited {elapsed:.2f} s after SIGINT")
