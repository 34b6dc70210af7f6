"""The routing-trace file: a versioned, columnar, compressed zip that numpy alone can read.

Format "moekit-routing-trace" version 2 (docs/trace-format.md is the specification):
a zip archive (deflate) holding `header.json` and one `.npy` member per column. Rows are
(sequence, layer, token) in that order; each row lists the experts its token executed
(a ragged assignment column), so a token using one expert stores one id.

  seq_tokens      int64   (S,)  tokens of each sequence
  seq_domain      int32   (S,)  index into header["domains"], -1 = no label
  row_experts     uint8/16 (R,) experts of each row, R = sum over sequences of L * T
  expert_ids      uint8/16/32 (N,) executed expert ids, N = sum(row_experts), rows in order,
                                  slot order within a row kept
  expert_weights  float32 (N,)  combine weights (optional)
  prefetch_rows_<d> uint8/16 (R,) predicted experts of each row at distance d (optional)
  prefetch_<d>    uint8/16/32 (P_d,) the predicted ids of layer l's router applied to the input of
                                  layer l - d, rows in order, best first (a ragged column of its own)

Version 1 (still read) stored `prefetch_<d>` in the slots of `expert_ids` (int16, -1 = none), so it
could hold no more predictions than the token executed experts; version 2 predicts whole router
choices (moekit.routers.predict), whose size need not match.

The header names the format and version, E, L, S, R, N, the domain and layer names, free-form
metadata and, per column, its dtype, shape and sha256 (of the array's raw bytes). Readers refuse
another format, an unknown version, a truncated or corrupted archive and a checksum mismatch, with
a message that names the problem. Writes are atomic (moekit.utils.io).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
import zlib
from pathlib import Path

import numpy as np

from moekit.analysis.metrics import RoutingTrace
from moekit.utils.io import atomic_write_with

__all__ = ["FORMAT", "VERSION", "TraceFormatError", "load_trace", "read_header", "save_trace"]

FORMAT = "moekit-routing-trace"
VERSION = 2
READS = (1, 2)  # versions this moekit reads
_HEADER = "header.json"


class TraceFormatError(ValueError):
    """A trace file that cannot be read: not a trace, truncated, corrupted or another version."""


def _smallest_uint(max_value: int) -> np.dtype:
    for dt in (np.uint8, np.uint16, np.uint32):
        if max_value <= np.iinfo(dt).max:
            return np.dtype(dt)
    return np.dtype(np.uint64)


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


def _sha256(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def trace_columns(trace: RoutingTrace) -> tuple[dict[str, np.ndarray], list[str] | None]:
    """The columns of `trace` (see the module doc) and its sorted domain names."""
    S, E = len(trace.seqs), trace.num_experts
    valid = [s >= 0 for s in trace.seqs]
    counts = np.concatenate([v.sum(axis=2).ravel() for v in valid])
    cols: dict[str, np.ndarray] = {
        "seq_tokens": np.array([s.shape[1] for s in trace.seqs], dtype=np.int64),
        "row_experts": counts.astype(_smallest_uint(int(counts.max()) if counts.size else 0)),
        # Boolean indexing walks (layer, token, slot) in C order: rows in order, slots compacted.
        "expert_ids": np.concatenate([s[v] for s, v in zip(trace.seqs, valid, strict=True)]).astype(
            _smallest_uint(E - 1)),
    }
    domains = None
    if trace.domains is not None:
        domains = sorted(set(trace.domains))
        index = {d: i for i, d in enumerate(domains)}
        cols["seq_domain"] = np.array([index[d] for d in trace.domains], dtype=np.int32)
    else:
        cols["seq_domain"] = np.full(S, -1, dtype=np.int32)
    if trace.weights is not None:
        cols["expert_weights"] = np.concatenate(
            [w[v] for w, v in zip(trace.weights, valid, strict=True)]).astype(np.float32)
    for d, preds in sorted((trace.prefetch or {}).items()):
        rows = np.concatenate([(p >= 0).sum(axis=2).ravel() for p in preds])
        cols[f"prefetch_rows_{d}"] = rows.astype(_smallest_uint(int(rows.max()) if rows.size else 0))
        cols[f"prefetch_{d}"] = np.concatenate([p[p >= 0] for p in preds]).astype(_smallest_uint(E - 1))
    return cols, domains


def save_trace(trace: RoutingTrace, path: str | os.PathLike) -> Path:
    """Write `trace` to `path` atomically (a temporary file in the same directory, fsync, rename)."""
    path = Path(path)
    cols, domains = trace_columns(trace)
    header = {
        "format": FORMAT,
        "version": VERSION,
        "num_experts": trace.num_experts,
        "num_layers": trace.num_layers,
        "num_sequences": len(trace.seqs),
        "num_rows": int(cols["row_experts"].size),
        "num_assignments": int(cols["expert_ids"].size),
        "row_order": ["sequence", "layer", "token"],
        "domains": domains,
        "layer_names": trace.layer_names,
        "prefetch_distances": sorted((trace.prefetch or {}).keys()),
        "meta": trace.meta or {},
        "columns": {name: {"dtype": a.dtype.str, "shape": list(a.shape), "sha256": _sha256(a)}
                    for name, a in cols.items()},
    }
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as z:
            z.writestr(_HEADER, json.dumps(header, indent=1))
            for name, a in cols.items():
                z.writestr(f"{name}.npy", _npy_bytes(a))

    atomic_write_with(path, write)
    return path


def _open(path: Path) -> zipfile.ZipFile:
    if not path.is_file():
        raise FileNotFoundError(f"routing trace {path} does not exist")
    try:
        return zipfile.ZipFile(path)
    except zipfile.BadZipFile as e:
        raise TraceFormatError(f"{path}: not a readable zip archive, the file is truncated or not a routing "
                               f"trace ({e})") from e


def _read_member(z: zipfile.ZipFile, name: str, path: Path) -> bytes:
    try:
        return z.read(name)
    except KeyError as e:
        raise TraceFormatError(f"{path}: member {name!r} is missing (the file is incomplete or not a "
                               f"routing trace)") from e
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
        raise TraceFormatError(f"{path}: member {name!r} is corrupted ({e})") from e


def _check_header(header: object, path: Path) -> dict:
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        fmt = header.get("format") if isinstance(header, dict) else None
        raise TraceFormatError(f"{path}: not a moekit routing trace (format {fmt!r}, expected {FORMAT!r})")
    version = header.get("version")
    if version not in READS:
        raise TraceFormatError(f"{path}: written by trace format version {version!r}; this moekit reads "
                               f"versions {', '.join(map(str, READS))}")
    required = ("num_experts", "num_layers", "num_sequences", "num_rows", "num_assignments", "columns")
    missing = [k for k in required if k not in header]
    if missing:
        raise TraceFormatError(f"{path}: header lacks {missing}")
    return header


def read_header(path: str | os.PathLike) -> dict:
    """The JSON header of a trace file, after checking its format and version."""
    path = Path(path)
    with _open(path) as z:
        raw = _read_member(z, _HEADER, path)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TraceFormatError(f"{path}: header.json is corrupted, not valid JSON ({e})") from e
    return _check_header(header, path)


def _read_columns(path: Path, header: dict) -> dict[str, np.ndarray]:
    cols = {}
    with _open(path) as z:
        for name, spec in header["columns"].items():
            raw = _read_member(z, f"{name}.npy", path)
            try:
                a = np.lib.format.read_array(io.BytesIO(raw), allow_pickle=False)
            except (ValueError, OSError, EOFError) as e:
                raise TraceFormatError(f"{path}: column {name!r} is corrupted ({e})") from e
            if a.dtype.str != spec["dtype"] or list(a.shape) != spec["shape"]:
                raise TraceFormatError(f"{path}: column {name!r} has dtype {a.dtype.str} shape {list(a.shape)}, "
                                       f"the header says {spec['dtype']} {spec['shape']}")
            if _sha256(a) != spec["sha256"]:
                raise TraceFormatError(f"{path}: column {name!r} is corrupted (sha256 mismatch)")
            cols[name] = a
    for name in ("seq_tokens", "seq_domain", "row_experts", "expert_ids"):
        if name not in cols:
            raise TraceFormatError(f"{path}: required column {name!r} is missing")
    return cols


def _ragged_to_padded(values_N: np.ndarray, counts_R: np.ndarray, T_S: np.ndarray, L: int, fill=-1,
                      dtype=np.int64) -> list[np.ndarray]:
    """Per sequence (L, T, K) arrays from a ragged column (rows in order, counts_R entries each);
    K = the most entries of any row of that sequence."""
    K = int(counts_R.max()) if counts_R.size else 0
    start_R = np.cumsum(counts_R) - counts_R
    row_N = np.repeat(np.arange(counts_R.size), counts_R)
    slot_N = np.arange(values_N.size) - start_R[row_N]  # slot = index minus the row's first index
    out_RK = np.full((counts_R.size, K), fill, dtype=dtype)
    out_RK[row_N, slot_N] = values_N
    seqs, r0 = [], 0
    for T in T_S:
        rows = int(L * T)
        k = int(counts_R[r0:r0 + rows].max()) if rows else 0
        seqs.append(out_RK[r0:r0 + rows, :k].reshape(L, int(T), k))
        r0 += rows
    return seqs


def load_trace(path: str | os.PathLike) -> RoutingTrace:
    """Read a trace file written by `save_trace` (any violation raises TraceFormatError)."""
    path = Path(path)
    header = read_header(path)
    cols = _read_columns(path, header)
    E, L, S = header["num_experts"], header["num_layers"], header["num_sequences"]
    T_S = cols["seq_tokens"].astype(np.int64)
    counts_R = cols["row_experts"].astype(np.int64)
    ids_N = cols["expert_ids"].astype(np.int64)

    def bad(msg: str) -> TraceFormatError:
        return TraceFormatError(f"{path}: inconsistent trace: {msg}")

    if T_S.size != S or cols["seq_domain"].size != S:
        raise bad(f"the header says {S} sequences, seq_tokens has {T_S.size}, seq_domain {cols['seq_domain'].size}")
    if counts_R.size != int(L * T_S.sum()) or counts_R.size != header["num_rows"]:
        raise bad(f"row_experts has {counts_R.size} rows, expected layers x tokens = {int(L * T_S.sum())}")
    if int(counts_R.sum()) != ids_N.size or ids_N.size != header["num_assignments"]:
        raise bad(f"row_experts sums to {int(counts_R.sum())} but expert_ids has {ids_N.size} entries")
    if ids_N.size and ids_N.max() >= E:
        raise bad(f"expert id {int(ids_N.max())} >= num_experts {E}")
    domains = header.get("domains")
    dom_idx = cols["seq_domain"]
    labels = None
    if domains is not None:
        if dom_idx.size and (dom_idx.min() < 0 or dom_idx.max() >= len(domains)):
            raise bad(f"seq_domain indexes outside the {len(domains)} domain names")
        labels = [domains[i] for i in dom_idx]

    def padded(values_N: np.ndarray, fill, dtype) -> list[np.ndarray]:
        return _ragged_to_padded(values_N, counts_R, T_S, L, fill, dtype)

    seqs = padded(ids_N, -1, np.int64)
    weights = padded(cols["expert_weights"], 0.0, np.float32) if "expert_weights" in cols else None
    prefetch = {}
    for d in header.get("prefetch_distances", []):
        name = f"prefetch_{d}"
        if name not in cols:
            raise TraceFormatError(f"{path}: column {name!r} is missing")
        pred = cols[name].astype(np.int64)
        if header["version"] == 1:  # predictions in the slots of expert_ids, -1 = none
            if pred.size != ids_N.size:
                raise bad(f"{name} has {pred.size} entries, expert_ids {ids_N.size}")
            prefetch[int(d)] = padded(pred, -1, np.int64)
            continue
        rows_name = f"prefetch_rows_{d}"
        if rows_name not in cols:
            raise TraceFormatError(f"{path}: column {rows_name!r} is missing")
        pred_R = cols[rows_name].astype(np.int64)
        if pred_R.size != counts_R.size or int(pred_R.sum()) != pred.size:
            raise bad(f"{rows_name} has {pred_R.size} rows summing to {int(pred_R.sum())}, expected "
                      f"{counts_R.size} rows summing to the {pred.size} entries of {name}")
        if pred.size and pred.max() >= E:
            raise bad(f"{name} holds expert id {int(pred.max())} >= num_experts {E}")
        prefetch[int(d)] = _ragged_to_padded(pred, pred_R, T_S, L)
    try:
        return RoutingTrace(seqs, E, labels, weights, prefetch or None, header.get("layer_names"),
                            header.get("meta") or {})
    except ValueError as e:
        raise bad(str(e)) from e
