"""One durability rule for every file moekit writes, and one ownership rule for directories.

Durability: write a temporary file in the target's directory, flush and fsync it, rename it over the
target (atomic on POSIX), then fsync the directory so the rename itself survives a crash. A reader
sees the old file or the new one, never half of one. Directories are built the same way
(`atomic_dir`): a temporary sibling directory, every file fsynced, one rename. Every file moekit
writes goes through `atomic_write_bytes` / `atomic_write_text` / `atomic_write_with` or `atomic_dir`;
nothing else in moekit calls os.replace or fsync (a test checks).

Ownership: a directory moekit creates as a unit (a run, an expert store, a report, an export, a
compare directory) carries a small marker file, `.moekit`, naming its kind. moekit deletes or replaces
only directories that carry its marker (or are empty); anything else is the user's and is refused
with `NotOwnedError`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from moekit.errors import NotOwnedError

MARKER = ".moekit"
TMP_TAG = ".tmp-"  # temporary names are ".NAME.tmp-PID": a later start can find and remove debris


def fsync_dir(path: str | os.PathLike) -> None:
    """Make renames and creations inside `path` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def tmp_path(path: str | os.PathLike) -> Path:
    """The temporary sibling used while `path` is being written: `.NAME.tmp-PID`."""
    path = Path(path)
    return path.with_name(f".{path.name}{TMP_TAG}{os.getpid()}")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write the whole file or nothing (temporary file, fsync, rename, directory fsync); a failed write
    (a full disk) raises an OSError naming `path` (see `writing`)."""
    path = Path(path)
    tmp = tmp_path(path)
    try:
        with writing(path), open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_with(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Atomic write through a writer that needs a path (e.g. a library's `save_file(tensors, path)`)."""
    path = Path(path)
    tmp = tmp_path(path)
    try:
        with writing(path):
            write(tmp)
            fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


@contextlib.contextmanager
def writing(path: str | os.PathLike, tmp: str | os.PathLike | None = None) -> Iterator[None]:
    """Name `path` in the OSError of a failed write: a full disk inside `f.write` says only "No space
    left on device", and libraries written in Rust (safetensors) report it as their own error type with
    "(os error 28)" in the text; both become OSError(errno, strerror, path). `tmp`: the temporary
    directory being built for `path`; an error naming a file inside it names `path` instead (the
    temporary is gone when the user reads the message)."""
    try:
        yield
    except OSError as e:
        inside = tmp is not None and e.filename is not None and str(e.filename).startswith(str(tmp))
        if e.errno is not None and (e.filename is None or inside):
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise
    except Exception as e:
        found = re.search(r"\(os error (\d+)\)", str(e))
        if found is None:
            raise
        code = int(found.group(1))
        raise OSError(code, os.strerror(code), str(path)) from e


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------------------- ownership


def write_marker(directory: str | os.PathLike, kind: str) -> None:
    """Mark `directory` as a moekit `kind` (run, store, report, export, compare)."""
    atomic_write_text(Path(directory) / MARKER, json.dumps({"kind": kind, "version": 1}) + "\n")


def marker_kind(directory: str | os.PathLike) -> str | None:
    """The kind recorded in `directory`'s marker, or None if it has none (or an unreadable one)."""
    path = Path(directory) / MARKER
    try:
        return json.loads(path.read_text(encoding="utf-8"))["kind"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_writable_dir(directory: str | os.PathLike, kind: str, what: str = "moekit") -> None:
    """Refuse (NotOwnedError) to write a `kind` into a directory that exists, is not empty and does
    not carry moekit's marker for that kind."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise NotOwnedError(f"{what}: {directory} exists and is not a directory")
    if not directory.is_dir() or not any(directory.iterdir()):
        return
    found = marker_kind(directory)
    if found != kind:
        owner = "another kind of moekit output" if found else "files moekit did not write"
        raise NotOwnedError(f"{what}: {directory} holds {owner}; refusing to overwrite it (expected an empty "
                            f"directory or a moekit {kind}); choose another directory")


def replace_dir(tmp: str | os.PathLike, target: str | os.PathLike, kind: str | None, what: str = "moekit") -> None:
    """Move the finished directory `tmp` to `target` atomically, replacing an old moekit `kind` there.

    `tmp` gets the marker first; `target` must be absent, empty or marked as `kind`. kind None: a
    directory inside one moekit owns (a checkpoint inside a run), replaced whole, without a marker.
    """
    tmp, target = Path(tmp), Path(target)
    if kind is not None:
        check_writable_dir(target, kind, what)
        write_marker(tmp, kind)
    fsync_dir(tmp)
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    os.replace(tmp, target)
    fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, kind: str | None, what: str = "moekit") -> Iterator[Path]:
    """Write the directory `target` as one unit: yields an empty temporary sibling (`.NAME.tmp-PID`) to
    fill; when the block ends normally every file in it is fsynced and it replaces `target` with one
    rename (`replace_dir`: `target` must be absent, empty or a moekit `kind`, and gets its marker).
    When the block raises (Ctrl-C included) the temporary is removed and `target` is as it was; a full
    disk raises an OSError naming `target`. Temporaries of killed writers of `target` are removed first.
    kind None: a directory inside one moekit owns (a checkpoint inside a run): no marker, no ownership
    check. Raises NotOwnedError before anything is written if `target` is not moekit's to replace.
    """
    target = Path(target)
    if kind is not None:
        check_writable_dir(target, kind, what)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_debris(target.parent, target.name)
    tmp = tmp_path(target)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with writing(target, tmp):
            tmp.mkdir()
            yield tmp
            for f in sorted(tmp.rglob("*")):
                if f.is_file():
                    fsync_file(f)
            replace_dir(tmp, target, kind, what)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_debris(directory: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Delete temporary files and directories (`.NAME.tmp-PID`, `.NAME.old-PID`) left in `directory` by
    killed writers whose process is gone; with `name`, only those of that one NAME (for a directory
    that is not moekit's, e.g. the parent of an expert store). An `.NAME.old-PID` whose NAME is
    missing (a writer killed between `replace_dir`'s two renames) is renamed back to NAME instead.
    Returns what was removed."""
    directory = Path(directory)
    removed = []
    if not directory.is_dir():
        return removed
    prefix = "." if name is None else f".{name}."
    for p in directory.iterdir():
        if not p.name.startswith(prefix):
            continue
        for tag in (TMP_TAG, ".old-"):
            if tag in p.name:
                stem, pid = p.name.rsplit(tag, 1)
                if name is not None and stem != f".{name}":
                    break
                if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
                    target = directory / stem[1:]
                    if tag == ".old-" and not target.exists():
                        # Killed between replace_dir's two renames: the old one is the only copy.
                        os.replace(p, target)
                        fsync_dir(directory)
                        break
                    shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                    removed.append(p)
                break
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
