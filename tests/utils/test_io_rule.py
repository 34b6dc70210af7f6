"""One durability rule: every file moekit writes goes through moekit.utils.io.

`atomic_dir` is checked directly; an `ast` scan of src/ then finds any hand-rolled rename, fsync or
write outside utils/io.py that is not inside a `with atomic_dir(...)` block (whose directory is
fsynced and renamed into place as a whole) or one of the few places listed below with the reason.
"""

import ast
from pathlib import Path

import pytest

from moekit.errors import NotOwnedError
from moekit.utils.io import MARKER, atomic_dir, marker_kind, write_marker

SRC = Path(__file__).resolve().parents[2] / "src" / "moekit"

# Calls that move or sync files: only utils/io.py may make them.
RENAME_OR_SYNC = {("os", "replace"), ("os", "rename"), ("os", "renames"), ("os", "fsync"), ("os", "fdatasync"),
                  ("shutil", "move")}
# Calls that write a file (attribute name, or a plain function name).
WRITERS = {"write_text", "write_bytes", "save_file", "save_model", "save_pretrained", "savez", "savez_compressed",
           "copyfile", "copy2", "copytree", "to_json_file"}
# (file, function): writes that are part of an atomic write made elsewhere, with the reason.
ALLOWED = {
    ("offload/store.py", "_write_layer_file"): "writes one layer file inside write_store's atomic_dir",
    ("analysis/tracefile.py", "write"): "the writer save_trace hands to atomic_write_with",
    ("train/trainer.py", "_train"): "metrics.jsonl is an append-only log: whole lines, a failed one cut back",
}


def _call_name(node: ast.Call) -> tuple[str | None, str | None]:
    f = node.func
    if isinstance(f, ast.Attribute):
        owner = f.value.id if isinstance(f.value, ast.Name) else None
        return owner, f.attr
    if isinstance(f, ast.Name):
        return None, f.id
    return None, None


def _writes_mode(node: ast.Call) -> bool:
    """open(path, "w"...) / ZipFile(path, "w"): a mode that writes."""
    mode = node.args[1] if len(node.args) > 1 else next((k.value for k in node.keywords if k.arg == "mode"), None)
    return isinstance(mode, ast.Constant) and isinstance(mode.value, str) and any(c in mode.value for c in "wax+")


def _violations(path: Path, root: Path = SRC) -> list[str]:
    rel = path.relative_to(root).as_posix()
    found = []

    def visit(node: ast.AST, func: str | None, in_atomic: bool) -> None:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            func = node.name
        if isinstance(node, ast.With | ast.AsyncWith):
            in_atomic = in_atomic or any(isinstance(i.context_expr, ast.Call)
                                         and _call_name(i.context_expr)[1] == "atomic_dir" for i in node.items)
        if isinstance(node, ast.Call):
            owner, name = _call_name(node)
            where = f"{rel}:{node.lineno} ({func or 'module'})"
            if (owner, name) in RENAME_OR_SYNC or name in ("fsync_file", "fsync_dir", "replace_dir", "tmp_path"):
                found.append(f"{where}: {owner}.{name} (renames and fsyncs belong to moekit.utils.io)")
            elif name in WRITERS or (name in ("open", "ZipFile") and _writes_mode(node)):
                if not in_atomic and (rel, func) not in ALLOWED:
                    found.append(f"{where}: {name}(...) writes outside atomic_dir / atomic_write_*")
        for child in ast.iter_child_nodes(node):
            visit(child, func, in_atomic)

    visit(ast.parse(path.read_text(), str(path)), None, False)
    return found


def test_no_hand_rolled_atomic_writes_in_src():
    files = [p for p in sorted(SRC.rglob("*.py")) if p.relative_to(SRC).as_posix() != "utils/io.py"]
    found = [v for p in files for v in _violations(p)]
    assert not found, "use moekit.utils.io (atomic_write_*, atomic_dir):\n" + "\n".join(found)


def test_the_scan_sees_a_hand_rolled_write(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import os\n\ndef save(p, t):\n    open(p + '.tmp', 'w').write(t)\n    os.replace(p + '.tmp', p)\n"
                   "\ndef ok(d):\n    with atomic_dir(d, 'x') as tmp:\n        (tmp / 'a').write_text('a')\n")
    found = _violations(bad, root=tmp_path)
    assert [f.split(": ", 1)[0] for f in found] == ["bad.py:4 (save)", "bad.py:5 (save)"]


def test_atomic_dir_replaces_the_directory_as_a_whole(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out, "report") as tmp:
        (tmp / "a.txt").write_text("one")
    assert (out / "a.txt").read_text() == "one" and marker_kind(out) == "report"
    with atomic_dir(out, "report") as tmp:
        (tmp / "b.txt").write_text("two")
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "b.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary or old copy left


def test_atomic_dir_leaves_the_target_as_it_was_on_an_error(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out, "report") as tmp:
        (tmp / "a.txt").write_text("one")
    with pytest.raises(RuntimeError, match="half"), atomic_dir(out, "report") as tmp:
        (tmp / "b.txt").write_text("two")
        raise RuntimeError("half written")
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "a.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_atomic_dir_refuses_what_moekit_does_not_own_before_writing(tmp_path):
    users = tmp_path / "users"
    users.mkdir()
    (users / "thesis.tex").write_text("x")
    with pytest.raises(NotOwnedError, match="refusing to overwrite"), atomic_dir(users, "store"):
        pytest.fail("the block must not run")
    other = tmp_path / "run"
    other.mkdir()
    write_marker(other, "run")
    with pytest.raises(NotOwnedError, match="another kind of moekit output"), atomic_dir(other, "store"):
        pytest.fail("the block must not run")
    assert (users / "thesis.tex").read_text() == "x"


def test_atomic_dir_without_a_kind_replaces_a_subdirectory_without_a_marker(tmp_path):
    sub = tmp_path / "step-1"
    sub.mkdir()
    (sub / "old").write_text("old")
    with atomic_dir(sub, None) as tmp:
        (tmp / "new").write_text("new")
    assert sorted(p.name for p in sub.iterdir()) == ["new"]
