"""One line for every user mistake (issue 12 item 4): `moekit <command>: <message>` on stderr, exit 2
for a usage error and 1 for a failure, 130 after Ctrl-C, the traceback only with MOEKIT_DEBUG=1.
Each case is run through moekit.cli.main as a user would type it."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from moekit.analysis import RoutingTrace, save_trace
from moekit.cli import main

from .io_support import random_trace, rewrite_trace, snapshot


def one_line(capsys, command: str) -> str:
    """stderr must be exactly one line `moekit COMMAND: ...`; returns the message."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"moekit {command}: "), err
    return lines[0]


GEN = ["--prompt", "ab", "--max-new-tokens", "2"]


@pytest.mark.parametrize("budget, code, message", [
    ("1e999", 2, r"expert budget '1e999' is not a finite size"),
    ("0.25", 2, r"less than one byte; for a fraction of the experts write '25%'"),
    ("1%", 2, r"holds 0 expert\(s\) of each layer's cache .* one token needs 2 experts"),
    ("nan%", 2, r"not a finite percentage"),
])
def test_bad_expert_budget_is_one_line_and_writes_nothing(io_run, capsys, budget, code, message):
    before = snapshot(io_run)
    assert main(["generate", str(io_run), *GEN, "--expert-budget", budget]) == code
    assert re.search(message, one_line(capsys, "generate"))
    assert snapshot(io_run) == before  # no expert store was written before the budget was checked


def test_static_policy_without_hot_set_is_refused_before_writing(io_run, capsys):
    before = snapshot(io_run)
    assert main(["generate", str(io_run), *GEN, "--expert-budget", "50%", "--policy", "static"]) == 2
    assert "needs a hot set" in one_line(capsys, "generate")
    assert main(["generate", str(io_run), *GEN, "--expert-budget", "50%", "--policy", "static",
                 "--hot-trace", str(io_run / "missing.npz")]) == 2
    assert "missing.npz does not exist" in one_line(capsys, "generate")
    assert snapshot(io_run) == before


@pytest.fixture
def store(io_run, tmp_path, capsys):
    out = tmp_path / "store"
    assert main(["offload", str(io_run), str(out)]) == 0
    capsys.readouterr()
    return out


@pytest.mark.parametrize("key", ["num_experts", "expert_nbytes", "layers", "tensors", "dtype"])
def test_store_manifest_missing_a_key_is_named(io_run, store, capsys, key):
    manifest = store / "manifest.json"
    m = json.loads(manifest.read_text())
    del m[key]
    manifest.write_text(json.dumps(m))
    assert main(["generate", str(io_run), *GEN, "--expert-budget", "50%", "--expert-store", str(store)]) == 1
    msg = one_line(capsys, "generate")
    assert str(manifest) in msg and f"key '{key}' is missing" in msg


def test_truncated_store_manifest_names_the_file(io_run, store, capsys):
    manifest = store / "manifest.json"
    manifest.write_bytes(manifest.read_bytes()[:200])
    assert main(["generate", str(io_run), *GEN, "--expert-budget", "50%", "--expert-store", str(store)]) == 1
    msg = one_line(capsys, "generate")
    assert f"{manifest} is not valid JSON" in msg and "damaged" in msg


def test_damaged_trace_header_names_the_file(tmp_path, capsys):
    path = save_trace(random_trace(), tmp_path / "t.npz")
    bad = rewrite_trace(path, tmp_path / "bad.npz")
    import zipfile

    with zipfile.ZipFile(bad) as z:
        members = {n: z.read(n) for n in z.namelist()}
    members["header.json"] = members["header.json"][:40]  # truncated JSON, valid zip
    with zipfile.ZipFile(bad, "w") as w:
        for n, raw in members.items():
            w.writestr(n, raw)
    assert main(["analyze", str(bad), "--out", str(tmp_path / "rep"), "--no-progress"]) == 1
    msg = one_line(capsys, "analyze")
    assert str(bad) in msg and "header.json is corrupted, not valid JSON" in msg
    assert not (tmp_path / "rep").exists()


def test_zero_token_trace_is_refused_in_one_line(tmp_path, capsys):
    path = save_trace(RoutingTrace([np.zeros((2, 0, 0), dtype=np.int64)], 4), tmp_path / "zero.npz")
    assert main(["analyze", str(path), "--out", str(tmp_path / "rep"), "--no-progress"]) == 1
    assert "the trace holds no tokens" in one_line(capsys, "analyze")
    assert not (tmp_path / "rep").exists()


def test_one_token_trace_still_renders_a_report(tmp_path, capsys):
    path = save_trace(RoutingTrace([np.array([[[0, 1]], [[2, 3]]])], 4, ["a"]), tmp_path / "one.npz")
    out = tmp_path / "rep"
    assert main(["analyze", str(path), "--out", str(out), "--no-progress", "--workers", "1", "--boot", "5"]) == 0
    page = (out / "report.html").read_text()
    assert "Segment routing best performance" not in page or "not available for this trace" in page
    assert page.count('<img class="plot"') >= 4  # load, experts per token, caches, prefetch, ...
    m = json.loads((out / "metrics.json").read_text())
    assert m["trace"]["num_tokens"] == 1 and (out / "trace.npz").is_file()


def test_samples_per_domain_zero_is_a_usage_error(io_run, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["analyze", str(io_run), "--out", str(tmp_path / "rep"), "--samples-per-domain", "0"])
    assert e.value.code == 2
    assert "argument --samples-per-domain: expected an integer >= 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "rep").exists()


def test_non_utf8_prompt_gives_no_traceback(io_run, capsys):
    # NOTE: the byte-level model takes the raw bytes; tokenizers that need UTF-8 refuse in one line
    # (tests/robustness/test_train_settings.py::test_a_prompt_that_is_not_utf8_is_taken_as_bytes_or_refused).
    prompt = b"abc\xff\xfe".decode("utf-8", "surrogateescape")  # what Python makes of such an argv entry
    assert main(["generate", str(io_run), "--prompt", prompt, "--max-new-tokens", "2"]) == 0
    assert "Traceback" not in capsys.readouterr().err


def test_offload_into_a_folder_that_is_not_a_store_is_refused(io_run, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "manifest.json").write_text('{"my": "data"}')
    (mine / "notes.txt").write_text("keep me")
    before = snapshot(mine)
    assert main(["offload", str(io_run), str(mine)]) == 2
    assert "holds files moekit did not write; refusing to overwrite it" in one_line(capsys, "offload")
    assert snapshot(mine) == before


def test_missing_run_directory(tmp_path, capsys):
    assert main(["offload", str(tmp_path / "nope"), str(tmp_path / "out")]) == 2
    assert "nope is not a moekit run" in one_line(capsys, "offload")
    assert not (tmp_path / "out").exists()


def test_moekit_debug_shows_the_traceback(io_run, capsys, monkeypatch):
    monkeypatch.setenv("MOEKIT_DEBUG", "1")
    from moekit.errors import UsageError

    with pytest.raises(UsageError, match="not a finite size"):
        main(["generate", str(io_run), *GEN, "--expert-budget", "1e999"])


def test_ctrl_c_exits_130_quietly(tmp_path, capsys, monkeypatch):
    import moekit.cli.analyze as analysis_cli

    def interrupted(_args):
        raise KeyboardInterrupt

    monkeypatch.setattr(analysis_cli, "_trace_source", interrupted)
    assert main(["analyze", str(tmp_path / "t.npz"), "--out", str(tmp_path / "rep")]) == 130
    assert capsys.readouterr().err == ""


def test_a_bug_keeps_its_traceback(tmp_path, monkeypatch):
    """Only errors a user can cause are turned into one line; a bug in moekit is not hidden."""
    import moekit.cli.analyze as analysis_cli

    def bug(_args):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(analysis_cli, "_trace_source", bug)
    with pytest.raises(ZeroDivisionError):
        main(["analyze", str(tmp_path / "t.npz"), "--out", str(tmp_path / "rep")])


def test_exit_codes_usage_2_failure_1(tmp_path, capsys):
    # A path that does not exist: a usage error.
    assert main(["analyze", str(tmp_path / "missing.npz"), "--out", str(tmp_path / "rep")]) == 2
    assert "missing.npz does not exist" in one_line(capsys, "analyze")
    # A damaged file: a failure.
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 truncated")
    assert main(["analyze", str(tmp_path / "bad.npz"), "--out", str(tmp_path / "rep")]) == 1
    assert "truncated or not a routing trace" in one_line(capsys, "analyze")
