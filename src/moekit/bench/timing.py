"""The one timing loop of moekit's benchmarks: competing implementations are timed round-robin (one
run of each in turn, after a warm-up of each), so that transient load on a shared machine falls on all
of them alike and their ratios stay honest; plus peak memory and the load average to report with them.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path


def round_robin(steps: dict[str, Callable[[], object]], repeats: int, warmup: int = 2,
                before_each: Callable[[], None] | None = None) -> dict[str, list[float]]:
    """Seconds of each of `repeats` runs of every step, taken round-robin after `warmup` runs of each.

    before_each: called (untimed) before every timed run, e.g. to flush caches. A step that times
    itself (e.g. one run in a worker process) returns its own seconds as a float; any other return
    value is ignored and the call is timed here with perf_counter.
    """
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            if before_each is not None:
                before_each()
            t0 = time.perf_counter()
            result = step()
            elapsed = time.perf_counter() - t0
            times[name].append(float(result) if isinstance(result, float) else elapsed)
    return times


def median_s(steps: dict[str, Callable[[], object]], repeats: int, warmup: int = 2,
             before_each: Callable[[], None] | None = None) -> dict[str, float]:
    """Median seconds per run of each step, measured with `round_robin`."""
    return {name: statistics.median(ts) for name, ts in round_robin(steps, repeats, warmup, before_each).items()}


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MiB (ru_maxrss)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> None:
    """Reset this process's peak RSS (VmHWM) so each case reports its own (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def status_bytes(field: str) -> int:
    """A size field of /proc/self/status (VmRSS, VmHWM, ...; Linux) in bytes; -1 if it has no such field."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return -1


def peak_rss_bytes() -> int:
    """Peak resident memory since the last `reset_peak_rss()` (VmHWM, Linux), bytes."""
    return status_bytes("VmHWM")


def load_average() -> dict[str, float]:
    """`uptime`'s load averages over 1, 5 and 15 minutes (how busy the machine was around a measurement)."""
    one, five, fifteen = os.getloadavg()
    return {"load_1m": round(one, 2), "load_5m": round(five, 2), "load_15m": round(fifteen, 2)}


def append_json_lines(path: str | Path, lines: list[dict]) -> None:
    """Append `lines` as JSON lines to the results file `path`: the whole file is rewritten atomically,
    so an interrupted run leaves the earlier results whole."""
    from moekit.utils.io import atomic_write_text

    path = Path(path)
    before = path.read_text() if path.exists() else ""
    atomic_write_text(path, before + "".join(json.dumps(line) + "\n" for line in lines))


def write_json_lines(lines: list[dict], out: str | Path | None) -> None:
    """Print `lines` as JSON lines and, with `out`, write them (replacing the file) atomically."""
    from moekit.utils.io import atomic_write_text

    text = "".join(json.dumps(line) + "\n" for line in lines)
    print(text, end="")
    if out:
        atomic_write_text(out, text)
