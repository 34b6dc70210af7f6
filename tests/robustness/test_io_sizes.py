"""Bounded resources (issue 12 item 5): header fields of traces and stores are checked against the
files' real sizes before anything is allocated. Today a trace header claiming 10^9 experts made
`analyze` grow by 100 MB/s until killed; each case here must be refused at once, naming the field."""

from __future__ import annotations

import json
import resource
import subprocess

import numpy as np
import pytest

from moekit.analysis import TraceFormatError, load_trace, save_trace
from moekit.errors import DataError
from moekit.offload import ExpertStore, ExpertStoreError, write_store

from .io_support import moekit_subprocess, random_trace, rewrite_trace, tiny_lm


@pytest.fixture
def trace_file(tmp_path):
    return save_trace(random_trace(), tmp_path / "t.npz")


def test_header_claiming_a_billion_experts_is_refused_when_read(trace_file, tmp_path):
    """The original report: only the header's num_experts edited (ids are still uint8)."""
    bad = rewrite_trace(trace_file, tmp_path / "bad.npz", header_fn=lambda h: h | {"num_experts": 10**9})
    with pytest.raises(TraceFormatError, match=r"num_experts = 1000000000, but expert ids are stored as uint8.*"
                                               r"E <= 256 only"):
        load_trace(bad)


def billion_expert_trace(trace_file, tmp_path):
    return rewrite_trace(trace_file, tmp_path / "big.npz", header_fn=lambda h: h | {"num_experts": 10**9},
                         column_fn=lambda name, a: a.astype(np.uint32) if name == "expert_ids" else a)


def test_a_consistent_billion_expert_trace_is_refused_by_analyze(trace_file, tmp_path):
    import tracemalloc

    from moekit.analysis.report import analyze

    bad = billion_expert_trace(trace_file, tmp_path)
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match=r"analysing a trace of E = 1000000000 experts x L = 2 layers needs "
                                            r"about [\d.e+]+ GiB of memory, more than half of this machine's"):
            analyze(bad, tmp_path / "rep", progress=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20  # refused from the header, not after allocating
    assert not (tmp_path / "rep").exists()


@pytest.mark.slow
def test_a_consistent_billion_expert_trace_is_refused_before_analysis_allocates(trace_file, tmp_path):
    """Ids widened to uint32 so that the file is self-consistent: `analyze` must refuse it from the
    arrays it would need, in one line, instead of allocating. Run in a child process whose address
    space is capped at 4 GiB, so that today's behaviour fails the test instead of the machine."""
    bad = billion_expert_trace(trace_file, tmp_path)
    limit = 4 << 30

    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    p = moekit_subprocess(["analyze", str(bad), "--out", str(tmp_path / "rep"), "--workers", "1", "--no-progress"],
                          stderr=subprocess.PIPE, stdout=subprocess.PIPE, preexec_fn=cap)
    try:
        _, err = p.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        p.kill()
        pytest.fail("moekit analyze kept running on a trace claiming 10^9 experts")
    assert p.returncode == 1, err
    assert err.count("\n") == 1 and err.startswith("moekit analyze: analysing a trace of E = 1000000000 experts"), err
    assert "needs about" in err and not (tmp_path / "rep").exists()


@pytest.mark.parametrize("field, value, message", [
    ("num_rows", 10**12, r"column 'row_experts' has shape \[\d+\] in the header, expected \[1000000000000\]"),
    ("num_assignments", 10**12, r"column 'expert_ids' has shape .* expected \[1000000000000\]"),
    ("num_sequences", -1, r"header field num_sequences is -1, expected an integer >= 0"),
    ("num_layers", "2", r"header field num_layers is '2', expected an integer >= 1"),
])
def test_header_counts_must_match_the_columns(trace_file, tmp_path, field, value, message):
    bad = rewrite_trace(trace_file, tmp_path / "bad.npz", header_fn=lambda h: h | {field: value})
    with pytest.raises(TraceFormatError, match=message):
        load_trace(bad)


def test_column_shapes_must_fit_in_their_members(trace_file, tmp_path):
    """Header and column specs agree with each other but claim far more values than the file holds."""
    def inflate(h):
        n = 10**11
        h["num_assignments"] = n
        for name in ("expert_ids", "expert_weights"):
            if name in h["columns"]:
                h["columns"][name]["shape"] = [n]
        return h

    bad = rewrite_trace(trace_file, tmp_path / "bad.npz", header_fn=inflate)
    with pytest.raises(TraceFormatError, match=r"declares 100000000000 values .* but its member holds \d+ bytes"):
        load_trace(bad)


def test_zip_member_claiming_more_than_deflate_can_hold_is_refused(trace_file, tmp_path):
    """A central directory edited to claim a 1 TB member: refused before zipfile allocates."""
    raw = bytearray(trace_file.read_bytes())
    name = b"expert_ids.npy"
    pos = raw.find(b"PK\x01\x02")  # central directory entries: signature, ..., size at +24, name at +46
    while raw[pos + 46:pos + 46 + len(name)] != name:
        pos = raw.find(b"PK\x01\x02", pos + 4)
        assert pos >= 0
    raw[pos + 24:pos + 28] = (0xFFFFFFF0).to_bytes(4, "little")
    bad = tmp_path / "bomb.npz"
    bad.write_bytes(bytes(raw))
    with pytest.raises(TraceFormatError, match="member 'expert_ids.npy' claims 4294967280 bytes"):
        load_trace(bad)


@pytest.fixture
def store(tmp_path):
    return write_store(tiny_lm(), tmp_path / "s")


def edit_manifest(store, fn):
    path = store / "manifest.json"
    m = json.loads(path.read_text())
    fn(m)
    path.write_text(json.dumps(m))


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update(num_experts=10**9), r"layers\[0\]\.file_nbytes is \d+, expected data_start \+ E x"),
    (lambda m: m.update(expert_nbytes=2**50), r"expert_nbytes is 1125899906842624, but its tensors take \d+ bytes"),
    (lambda m: m["layers"][0].update(data_start=2**40), r"layers\[0\]\.file_nbytes is \d+, expected"),
    (lambda m: m.update(num_layers=10**6), r"layers is .*, expected a list of num_layers = 1000000 entries"),
    (lambda m: m["tensors"][0].update(shape=[10**9, 10**9]), r"tensors\[0\]\.shape is \[1000000000, 1000000000\]"),
    (lambda m: m["layers"][1].update(file="../../etc/passwd"), r"layers\[1\]\.file is '\.\./\.\./etc/passwd', "
                                                              r"expected a file name inside the store"),
    (lambda m: m.update(num_layers=True), r"num_layers is True, expected an integer >= 1"),
    (lambda m: m.update(dtype="int4"), r"dtype is 'int4', expected one of"),
    (lambda m: m["layers"][0]["experts"][3].update(offset=0), r"experts\[3\]\.offset is 0, expected \d+"),
])
def test_store_manifest_fields_are_checked_before_any_allocation(store, edit, message):
    edit_manifest(store, edit)
    with pytest.raises(ExpertStoreError, match=message):
        ExpertStore(store)


def test_store_manifest_that_is_not_an_object(store):
    (store / "manifest.json").write_text("[1, 2, 3]")
    with pytest.raises(ExpertStoreError, match="holds a JSON list, expected an object"):
        ExpertStore(store)


def test_errors_belong_to_the_hierarchy_and_keep_their_old_bases():
    from moekit.errors import MoekitError, UsageError
    from moekit.hf.detect import UnsupportedBlockError
    from moekit.hf.export import ExportError, ExportVerificationError
    from moekit.offload import PrefetchError

    assert issubclass(ExpertStoreError, DataError) and issubclass(ExpertStoreError, RuntimeError)
    assert issubclass(TraceFormatError, DataError) and issubclass(TraceFormatError, ValueError)
    assert issubclass(ExportError, UsageError) and ExportVerificationError.exit_code == 1
    assert issubclass(UnsupportedBlockError, UsageError) and issubclass(UnsupportedBlockError, ValueError)
    assert issubclass(PrefetchError, MoekitError) and issubclass(PrefetchError, RuntimeError)
