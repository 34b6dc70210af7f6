"""A full disk (ENOSPC) fails with one line naming the target and leaves no partial file: expert
stores, traces, analyze sets (metrics.json + trace + report.html, all or nothing) and exports
(issue 12 item 3). Fast tests inject the error; the slow ones fill a real 64 KiB tmpfs (as root) or,
failing that, a size-limited child process (RLIMIT_FSIZE, where writes fail with EFBIG)."""

from __future__ import annotations

import errno
import os
import resource
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from moekit.analysis import load_trace, save_trace
from moekit.cli import main

from .io_support import moekit_subprocess, random_trace, snapshot


@pytest.fixture
def enospc_on(monkeypatch):
    """enospc_on(name): os.fsync of any file whose name contains `name` fails as a full disk does."""
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc/self/fd to name an fsynced file")
    real = os.fsync

    def arm(name: str) -> None:
        def fsync(fd):
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                target = ""
            if name in os.path.basename(target):
                raise OSError(errno.ENOSPC, "No space left on device")  # no file name, as from write()
            return real(fd)

        monkeypatch.setattr(os, "fsync", fsync)

    return arm


def without_progress_bars(err: str) -> str:
    """stderr without transformers' "Writing model shards" progress bar (carriage-return updates)."""
    lines = err.replace("\r", "\n").splitlines()
    return "".join(line + "\n" for line in lines if line.strip() and "Writing model shards" not in line)


def one_failure_line(capsys, command: str, target: Path) -> str:
    err = without_progress_bars(capsys.readouterr().err)
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith(f"moekit {command}: No space left on device: {target}"), err
    assert "nothing was left half-written" in err
    return err


def test_store_write_on_a_full_disk(io_run, tmp_path, capsys, enospc_on):
    out = tmp_path / "store"
    enospc_on("layer-001.safetensors")
    assert main(["offload", str(io_run), str(out)]) == 1
    one_failure_line(capsys, "offload", out)
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # no store, no temporary directory


def test_trace_write_on_a_full_disk_keeps_the_old_file(tmp_path, enospc_on):
    path = save_trace(random_trace(seed=0), tmp_path / "t.npz")
    before = snapshot(tmp_path)
    enospc_on("t.npz")
    with pytest.raises(OSError, match=f"No space left on device: '{path}'"):
        save_trace(random_trace(seed=1), path)
    assert snapshot(tmp_path) == before
    load_trace(path)


def test_analyze_writes_its_set_or_nothing(tmp_path, capsys, enospc_on, monkeypatch):
    from moekit.analysis.report import plots

    monkeypatch.setattr(plots, "draw_plots", lambda m: {})  # the set's writing is under test, not the plots
    trace = save_trace(random_trace(seed=0), tmp_path / "t.npz")
    out = tmp_path / "rep"
    args = ["analyze", str(trace), "--out", str(out), "--workers", "1", "--boot", "5", "--no-progress"]
    assert main(args) == 0
    capsys.readouterr()
    save_trace(random_trace(seed=1), trace)
    before = snapshot(tmp_path)
    enospc_on("report.html")  # metrics.json and the trace are written first, then the disk is full
    assert main(args) == 1
    one_failure_line(capsys, "analyze", out)
    assert snapshot(tmp_path) == before  # the earlier set is whole: no new metrics.json beside an old page


def test_export_on_a_full_disk(io_run, tmp_path, capsys, monkeypatch):
    """transformers writes through safetensors (Rust), whose error is not an OSError."""
    import transformers.modeling_utils as mu

    def full(*_a, **_k):
        raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(mu, "safe_save_file", full)
    out = tmp_path / "hf"
    assert main(["export", str(io_run), "--to", "hf", str(out)]) == 1
    one_failure_line(capsys, "export", out)
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # no export, no temporary directory


# ----------------------------------------------------------------------------- a real full disk


def _mount_tmpfs(path: Path) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    path.mkdir()
    return subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    """(directory, preexec_fn): a 64 KiB tmpfs when root may mount one, else a directory plus a
    child-process file-size limit of 64 KiB (writes beyond it fail with EFBIG)."""
    disk = tmp_path / "small"
    if _mount_tmpfs(disk):
        try:
            yield disk, None
        finally:
            subprocess.run(["umount", str(disk)], check=False)
        return
    if not hasattr(resource, "RLIMIT_FSIZE"):
        pytest.skip("neither a tmpfs mount (needs root) nor RLIMIT_FSIZE is available")
    disk.mkdir(exist_ok=True)

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))

    yield disk, limit


@pytest.mark.slow
@pytest.mark.parametrize("command", ["offload", "analyze", "export"])
def test_a_real_full_disk(io_run, tmp_path, small_disk, command):
    disk, limit = small_disk
    (disk / "keep.txt").write_text("the user's file")
    before = snapshot(disk)
    out = disk / "out"
    if command == "offload":
        args = ["offload", str(io_run), str(out)]
    elif command == "analyze":
        args = ["analyze", str(save_trace(random_trace(T=200), tmp_path / "t.npz")), "--out", str(out),
                "--workers", "1", "--boot", "5", "--no-progress"]
    else:
        args = ["export", str(io_run), "--to", "hf", str(out)]
    p = moekit_subprocess(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=limit)
    _, err = p.communicate(timeout=300)
    lines = without_progress_bars(err).splitlines()
    assert p.returncode == 1, err
    assert len(lines) == 1 and lines[0].startswith(f"moekit {command}: "), err
    assert ("No space left on device" in lines[0] or "File too large" in lines[0]) and str(out) in lines[0], err
    assert snapshot(disk) == before  # nothing new, nothing partial, the user's file intact
