"""Directories `moekit train` and `moekit compare` write: ownership and one writer at a time.

A run directory carries moekit's marker (`.moekit`, kind "run"; a compare directory: kind
"compare"). A directory holding anything else is the user's and is refused (NotOwnedError), never
overwritten. Runs written before the marker existed (config.json with "model" and "train", and
checkpoints/LATEST) are recognised as runs and get the marker when written to again.

While writing, a process holds an exclusive `flock` on `DIR/.moekit.lock` (which records its
process id and command line). The kernel releases the lock when the process exits or dies, so a
second writer is refused naming the holder, and a killed one leaves no stale lock. Under the lock,
temporary files of killed writers (`.NAME.tmp-PID`) are removed.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from moekit.errors import MoekitError, NotOwnedError
from moekit.utils.io import MARKER, TMP_TAG, marker_kind, remove_debris, write_marker

LOCK = ".moekit.lock"


class DirectoryLockedError(MoekitError):
    """Another process is writing this run or compare directory."""


def is_legacy_run(directory: Path) -> bool:
    """A run written by a moekit without markers: config.json with model and train, and LATEST."""
    directory = Path(directory)
    if not (directory / "checkpoints" / "LATEST").is_file():
        return False
    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "model" in config and "train" in config


def _is_legacy_compare(directory: Path) -> bool:
    return (directory / "compare.json").is_file() or any(is_legacy_run(p) for p in directory.iterdir() if p.is_dir())


_LEGACY = {"run": is_legacy_run, "compare": _is_legacy_compare}


def _internal(name: str) -> bool:
    # the lock and a marker being written by a concurrent start are not content
    return name == LOCK or name.startswith(f".{MARKER}{TMP_TAG}")


def check_owned(directory: str | os.PathLike, kind: str, what: str) -> None:
    """Refuse (NotOwnedError) a `directory` that exists and holds anything but a moekit `kind`."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise NotOwnedError(f"{what}: {directory} exists and is not a directory")
    if not directory.is_dir() or all(_internal(p.name) for p in directory.iterdir()):
        return
    found = marker_kind(directory)
    if found == kind or (found is None and _LEGACY[kind](directory)):
        return
    owner = f"a moekit {found}" if found else "files moekit did not write"
    raise NotOwnedError(f"{what}: {directory} holds {owner}; refusing to write into it (expected an empty "
                        f"directory or a moekit {kind}); choose another directory")


def _command() -> str:
    argv = [os.path.basename(sys.argv[0]), *sys.argv[1:]] if sys.argv and sys.argv[0] else ["python"]
    return " ".join(argv)[:200]


@contextmanager
def locked_dir(directory: str | os.PathLike, kind: str, what: str) -> Iterator[Path]:
    """Own `directory` as a moekit `kind` while the block runs: check ownership, create it, take its
    lock (DirectoryLockedError naming the holder if another process has it), mark it and remove
    debris of killed writers. The lock is released on exit, or by the kernel if the process dies."""
    directory = Path(directory)
    check_owned(directory, kind, what)
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 300, 0).decode("utf-8", errors="replace").strip() or "another process"
            raise DirectoryLockedError(f"{what}: {directory} is in use by {holder}; wait for it to finish or "
                                       "choose another directory") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()} ({_command()})\n".encode(), 0)
        check_owned(directory, kind, what)  # again: now no other moekit writer can change it
        if marker_kind(directory) != kind:
            write_marker(directory, kind)
        remove_debris(directory)
        yield directory
    finally:
        os.close(fd)
