"""The trace file: round trip, readable with numpy alone, atomic writes, and refusal (with a
message naming the problem) of truncated, corrupted and foreign-version files."""

import hashlib
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from moekit.analysis import (
    RoutingTrace,
    TraceFormatError,
    gate_prefetch_recall,
    load_trace,
    read_header,
    save_trace,
    tracefile,
)


def sample_trace(seed: int = 0) -> RoutingTrace:
    """Dynamic routing (1..3 experts, slots compacted to the front), weights, and router predictions
    of their own width (0..4 experts, not tied to the executed slots)."""
    rng = np.random.default_rng(seed)
    L, E = 3, 300  # E > 255: ids need uint16
    seqs, weights, preds = [], [], []
    for T in (7, 1, 12, 0):
        ids = np.argsort(rng.random((L, T, E)), axis=2)[:, :, :3]
        k = rng.integers(1, 4, size=(L, T, 1))
        ids = np.where(np.arange(3) < k, ids, -1)
        seqs.append(ids)
        weights.append(np.where(ids >= 0, rng.random(ids.shape), 0).astype(np.float32))
        p = np.argsort(rng.random((L, T, E)), axis=2)[:, :, :4]
        p = np.where(np.arange(4) < rng.integers(0, 5, size=(L, T, 1)), p, -1)
        p[0] = -1  # layer 0 has no layer before it
        preds.append(p)
    return RoutingTrace(seqs, E, ["python", "german", "python", "french"], weights, {1: preds},
                        ["model.layers.0.mlp", "model.layers.1.mlp", "model.layers.2.mlp"], {"model": "tiny"})


def assert_same(a: RoutingTrace, b: RoutingTrace) -> None:
    """Equal up to the slot padding: a loaded sequence is padded to the most experts it uses
    (predictions: to the most predicted experts)."""
    assert a.num_experts == b.num_experts and a.domains == b.domains and a.layer_names == b.layer_names
    for i, (x, y) in enumerate(zip(a.seqs, b.seqs, strict=True)):
        k = y.shape[2]
        assert k == (int((x >= 0).sum(axis=2).max()) if x.size else 0)
        np.testing.assert_array_equal(x[..., :k], y)
        np.testing.assert_array_equal(a.weights[i][..., :k], b.weights[i])
        for d in a.prefetch:
            p, q = a.prefetch[d][i], b.prefetch[d][i]
            j = q.shape[2]
            assert j == (int((p >= 0).sum(axis=2).max()) if p.size else 0)
            np.testing.assert_array_equal(p[..., :j], q)
    assert sorted(a.prefetch) == sorted(b.prefetch)


def test_round_trip(tmp_path):
    trace = sample_trace()
    path = save_trace(trace, tmp_path / "sub" / "r.trace")
    back = load_trace(path)
    assert_same(trace, back)
    assert back.meta == {"model": "tiny"}
    header = read_header(path)
    assert header["format"] == "moekit-routing-trace" and header["version"] == 2
    # some token is predicted more experts than it ran (impossible in version 1)
    assert any(((p >= 0).sum(axis=2) > (s >= 0).sum(axis=2)).any() for p, s in zip(trace.prefetch[1], trace.seqs, strict=True))
    assert header["num_rows"] == 3 * (7 + 1 + 12) and header["columns"]["expert_ids"]["dtype"] == "<u2"
    assert not [p for p in path.parent.iterdir() if p.name != "r.trace"]  # no temporary left behind


def test_slots_are_compacted_on_save(tmp_path):
    seq = np.array([[[-1, 2], [1, -1], [-1, -1]]])  # (L=1, T=3, K=2), a gap before an id
    back = load_trace(save_trace(RoutingTrace([seq], 4), tmp_path / "g.trace"))
    np.testing.assert_array_equal(back.seqs[0], [[[2], [1], [-1]]])
    assert back.domains is None and back.weights is None and back.prefetch is None


def read_with_numpy_only(path):
    """The reader of docs/trace-format.md: zipfile + json + hashlib + numpy, no moekit."""
    with np.load(path) as z:
        header = json.loads(z["header.json"])
        cols = {name: z[name] for name in header["columns"]}
    for name, spec in header["columns"].items():
        assert hashlib.sha256(cols[name].tobytes()).hexdigest() == spec["sha256"]
    L = header["num_layers"]
    starts = np.concatenate([[0], np.cumsum(cols["row_experts"].astype(np.int64))])
    seqs, r = [], 0
    for T in cols["seq_tokens"]:
        rows = [cols["expert_ids"][starts[i]:starts[i + 1]].tolist() for i in range(r, r + L * T)]
        seqs.append([rows[layer * T:(layer + 1) * T] for layer in range(L)])  # [layer][token] -> ids
        r += L * T
    return header, seqs


def test_documented_numpy_only_reader(tmp_path):
    trace = sample_trace(1)
    path = save_trace(trace, tmp_path / "n.trace")
    header, seqs = read_with_numpy_only(path)
    assert header["domains"] == ["french", "german", "python"]
    for s, ref in zip(seqs, trace.seqs, strict=True):
        for layer in range(trace.num_layers):
            for t in range(ref.shape[1]):
                assert s[layer][t] == [int(e) for e in ref[layer, t] if e >= 0]


def test_truncated_file_is_refused(tmp_path):
    path = save_trace(sample_trace(), tmp_path / "t.trace")
    data = path.read_bytes()
    for cut in (len(data) // 2, len(data) - 10, 3):
        bad = tmp_path / f"cut{cut}.trace"
        bad.write_bytes(data[:cut])
        with pytest.raises(TraceFormatError, match="truncated"):
            load_trace(bad)


def test_corrupted_member_is_refused(tmp_path):
    path = save_trace(sample_trace(), tmp_path / "c.trace")
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        info = z.getinfo("expert_ids.npy")
    # Flip bytes inside the compressed data of one member (local header is 30 + name + extra bytes).
    start = info.header_offset + 30 + len(info.filename) + len(info.extra) + 5
    for i in range(start, start + 8):
        data[i] ^= 0xFF
    bad = tmp_path / "bad.trace"
    bad.write_bytes(bytes(data))
    with pytest.raises(TraceFormatError, match="'expert_ids.npy' is corrupted"):
        load_trace(bad)


def rewrite(path, out, header_fn=None, column_fn=None):
    """Copy a trace zip, editing the header and/or columns (with valid zip CRCs)."""
    with zipfile.ZipFile(path) as z, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as w:
        for name in z.namelist():
            raw = z.read(name)
            if name == "header.json" and header_fn:
                raw = json.dumps(header_fn(json.loads(raw))).encode()
            elif name.endswith(".npy") and column_fn:
                a = np.lib.format.read_array(io.BytesIO(raw))
                a = column_fn(name[:-4], a)
                buf = io.BytesIO()
                np.lib.format.write_array(buf, a)
                raw = buf.getvalue()
            w.writestr(name, raw)
    return out


def test_checksum_mismatch_is_refused(tmp_path):
    path = save_trace(sample_trace(), tmp_path / "s.trace")

    def change(name, a):
        if name == "expert_weights":
            a = a.copy()
            a[0] += 1
        return a

    bad = rewrite(path, tmp_path / "bad.trace", column_fn=change)
    with pytest.raises(TraceFormatError, match="column 'expert_weights' is corrupted \\(sha256 mismatch\\)"):
        load_trace(bad)


def v1_sample_trace() -> RoutingTrace:
    """The trace tests/analysis/data/trace_v1.npz holds: written by moekit's version-1 writer (commit
    f6a9703) from this construction, predictions in the executed slots."""
    rng = np.random.default_rng(0)
    L, E = 3, 300
    seqs, weights, preds = [], [], []
    for T in (7, 1, 12, 0):
        ids = np.argsort(rng.random((L, T, E)), axis=2)[:, :, :3]
        k = rng.integers(1, 4, size=(L, T, 1))
        ids = np.where(np.arange(3) < k, ids, -1)
        seqs.append(ids)
        weights.append(np.where(ids >= 0, rng.random(ids.shape), 0).astype(np.float32))
        p = np.where(ids >= 0, (ids + 1) % E, -1)
        p[0] = -1
        preds.append(p)
    return RoutingTrace(seqs, E, ["python", "german", "python", "french"], weights, {1: preds},
                        ["model.layers.0.mlp", "model.layers.1.mlp", "model.layers.2.mlp"], {"model": "tiny"})


def test_version_1_files_still_load(tmp_path):
    path = Path(__file__).parent / "data" / "trace_v1.npz"
    assert read_header(path)["version"] == 1
    old = load_trace(path)
    assert_same(v1_sample_trace(), old)
    # ... and analyse: layer 0 has no prediction; at the others, recall counts executed experts that
    # are among the token's predictions ((id + 1) % E of its other experts).
    recall = gate_prefetch_recall(old)[1]
    hits, reqs = np.zeros(3), np.zeros(3)
    for s, p in zip(old.seqs, old.prefetch[1], strict=True):
        for layer in range(3):
            for t in range(s.shape[1]):
                executed = {e for e in s[layer, t] if e >= 0}
                hits[layer] += len(executed & {e for e in p[layer, t] if e >= 0})
                reqs[layer] += len(executed)
    assert np.isnan(recall[0]) and 0 < hits[1:].sum()
    np.testing.assert_allclose(recall[1:], hits[1:] / reqs[1:])
    # Rewritten, it becomes a version-2 file with the same content.
    again = load_trace(save_trace(old, tmp_path / "v2.trace"))
    assert read_header(tmp_path / "v2.trace")["version"] == 2
    assert_same(old, again)


def test_wrong_version_and_format_are_refused(tmp_path):
    path = save_trace(sample_trace(), tmp_path / "v.trace")
    v3 = rewrite(path, tmp_path / "v3.trace", header_fn=lambda h: {**h, "version": 3})
    with pytest.raises(TraceFormatError, match="written by trace format version 3; this moekit reads versions 1, 2"):
        load_trace(v3)
    other = rewrite(path, tmp_path / "o.trace", header_fn=lambda h: {**h, "format": "something-else"})
    with pytest.raises(TraceFormatError, match="not a moekit routing trace"):
        load_trace(other)
    no_header = tmp_path / "nh.trace"
    with zipfile.ZipFile(no_header, "w") as z:
        z.writestr("a.npy", b"")
    with pytest.raises(TraceFormatError, match="'header.json' is missing"):
        load_trace(no_header)
    not_json = tmp_path / "j.trace"
    with zipfile.ZipFile(not_json, "w") as z:
        z.writestr("header.json", b"{not json")
    with pytest.raises(TraceFormatError, match="not valid JSON"):
        load_trace(not_json)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_trace(tmp_path / "missing.trace")


def test_inconsistent_columns_are_refused(tmp_path):
    path = save_trace(sample_trace(), tmp_path / "i.trace")
    assignment_columns = ("expert_ids", "expert_weights", "prefetch_1")

    def drop_one(name, a):
        return a[:-1] if name in assignment_columns else a

    def fix_specs(h):
        with zipfile.ZipFile(bad) as z:
            for name in assignment_columns:
                a = np.lib.format.read_array(io.BytesIO(z.read(f"{name}.npy")))
                spec = h["columns"][name]
                spec["shape"], spec["sha256"] = list(a.shape), hashlib.sha256(a.tobytes()).hexdigest()
        return h

    def fix_count(h):
        h["num_assignments"] -= 1
        return h

    bad = rewrite(path, tmp_path / "bad.trace", column_fn=drop_one)
    with pytest.raises(TraceFormatError, match="has dtype .* shape"):
        load_trace(bad)
    fixed = rewrite(bad, tmp_path / "fixed.trace", header_fn=fix_specs)
    with pytest.raises(TraceFormatError, match=r"column 'expert_ids' has shape \[\d+\] in the header, expected"):
        load_trace(fixed)  # the header's own count disagrees with the columns' declared shapes
    fixed = rewrite(fixed, tmp_path / "fixed2.trace", header_fn=fix_count)
    with pytest.raises(TraceFormatError, match="row_experts sums to"):
        load_trace(fixed)


def test_prefetch_columns_are_checked(tmp_path):
    path = save_trace(sample_trace(), tmp_path / "p.trace")

    def rehash(name):
        def fn(h):
            with zipfile.ZipFile(out[name]) as z:
                for col in h["columns"]:
                    a = np.lib.format.read_array(io.BytesIO(z.read(f"{col}.npy")))
                    h["columns"][col].update(dtype=a.dtype.str, shape=list(a.shape),
                                             sha256=hashlib.sha256(a.tobytes()).hexdigest())
            return h
        return fn

    out = {"short": tmp_path / "short.trace", "big": tmp_path / "big.trace"}
    rewrite(path, out["short"], column_fn=lambda name, a: a[1:] if name == "prefetch_rows_1" else a)
    with pytest.raises(TraceFormatError, match="prefetch_rows_1 has .* rows"):
        load_trace(rewrite(out["short"], tmp_path / "short2.trace", header_fn=rehash("short")))
    rewrite(path, out["big"], column_fn=lambda name, a: a + 300 if name == "prefetch_1" else a)
    with pytest.raises(TraceFormatError, match="prefetch_1 holds expert id"):
        load_trace(rewrite(out["big"], tmp_path / "big2.trace", header_fn=rehash("big")))


def test_failed_write_leaves_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = save_trace(sample_trace(0), tmp_path / "a.trace")
    before = path.read_bytes()

    def boom(a):
        raise OSError("disk full")

    monkeypatch.setattr(tracefile, "_npy_bytes", boom)
    with pytest.raises(OSError, match="disk full"):
        save_trace(sample_trace(1), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["a.trace"]
