"""The routing-trace file: a versioned, columnar, compressed zip that numpy alone can read.

Format "moekit-routing-trace" version 2 (docs/trace-format.md is the specification):
a zip archive (deflate) holding `header.json` and one `.npy` member per column. Rows are
(sequence, layer, token) in that order; each row lists the experts its token executed
(a ragged assignment column), so a token using one expert stores one id.

  seq_tokens      int64   (S,)  tokens of each sequence
  seq_domain      int32   (S,)  index into header["domains"], -1 = no label
  row_experts     uint8/16 (Q,) experts of each row, Q = sum over sequences of L * T
  expert_ids      uint8/16/32 (N,) executed expert ids, N = sum(row_experts), rows in order,
                                  slot order within a row kept
  expert_weights  float32 (N,)  combine weights (optional)
  token_loss      float32 (sum of seq_tokens,) next-token loss of each token, sequences in order,
                                  NaN where there is no next token (optional)
  expert_iterations uint8 (N,)  Chain-of-Experts iteration mask of each executed id: bit t = iteration t
                                  ran it (optional; absent = one iteration, as every older file)
  prefetch_rows_<d> uint8/16 (Q,) predicted experts of each row at distance d (optional)
  prefetch_<d>    uint8/16/32 (P_d,) the predicted ids of layer l's router applied to the input of
                                  layer l - d, rows in order, best first (a ragged column of its own)

Version 1 (still read) stored `prefetch_<d>` in the slots of `expert_ids` (int16, -1 = none), so it
could hold no more predictions than the token executed experts; version 2 predicts whole router
choices (moekit.routers.predict), whose size need not match.

The header names the format and version, E, L, S, Q, N, the domain and layer names, free-form
metadata and, per column, its dtype, shape and sha256 (of the array's raw bytes). Readers refuse
another format, an unknown version, a truncated or corrupted archive and a checksum mismatch, with a
message that names the problem. Every size the header declares is checked against the archive's
real size before anything is read or allocated (`_check_sizes`): a header claiming 10^9 experts or
rows is refused in milliseconds. Writes are atomic: temporary file, fsync, rename (moekit.utils.io);
the temporary file of a killed write is removed by the next write to the same path.
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

from moekit.analysis.routing_trace import RoutingTrace
from moekit.errors import DataError
from moekit.utils.io import atomic_write_with, remove_debris

__all__ = ["FORMAT", "VERSION", "TraceFormatError", "check_memory", "load_trace", "read_header", "save_trace"]

FORMAT = "moekit-routing-trace"
VERSION = 2
READS = (1, 2)  # versions this moekit reads
_HEADER = "header.json"
# deflate cannot expand data by more than about 1032:1; a member claiming more is not a deflate stream.
_MAX_DEFLATE_RATIO = 1100
_NPY_HEADER_MAX = 1 << 16  # bytes of a .npy member beyond its array data (the .npy header)


class TraceFormatError(DataError):  # a DataError is a ValueError, as before
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
    if trace.token_loss is not None:
        cols["token_loss"] = np.concatenate(trace.token_loss).astype(np.float32)
    if trace.iterations is not None:
        cols["expert_iterations"] = np.concatenate(
            [m[v] for m, v in zip(trace.iterations, valid, strict=True)]).astype(np.uint8)
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
    remove_debris(path.parent, path.name)  # the temporary file of a killed write

    def write(tmp: Path) -> None:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as z:
            z.writestr(_HEADER, json.dumps(header, indent=1))
            for name, a in cols.items():
                z.writestr(f"{name}.npy", _npy_bytes(a))

    atomic_write_with(path, write)  # a full disk raises an OSError naming `path`
    return path


def check_memory(nbytes: float, what: str) -> None:
    """Refuse (DataError) work whose arrays would need more than half of this machine's memory, before
    anything is allocated; `what` says which file or header field asks for it."""
    try:
        limit = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (ValueError, OSError, AttributeError):
        return
    if nbytes > limit:
        raise DataError(f"{what} needs about {_gib(nbytes)} of memory, more than half of this machine's "
                        f"{_gib(2 * limit)}; the file is damaged or too large to analyse here")


def _gib(n: float) -> str:
    return f"{n / 2**30:.3g} GiB"


def _open(path: Path) -> zipfile.ZipFile:
    """The archive, after checking that no member claims more bytes than the file can hold."""
    if not path.is_file():
        raise FileNotFoundError(f"routing trace {path} does not exist")
    try:
        z = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise TraceFormatError(f"{path}: not a readable zip archive, the file is truncated or not a routing "
                               f"trace ({e})") from e
    size = path.stat().st_size
    for info in z.infolist():
        ratio = 1 if info.compress_type == zipfile.ZIP_STORED else _MAX_DEFLATE_RATIO
        if info.compress_size > size or info.file_size > ratio * info.compress_size + 1024:
            z.close()
            raise TraceFormatError(f"{path}: member {info.filename!r} claims {info.file_size} bytes from "
                                   f"{info.compress_size} compressed bytes in a {size}-byte file; the archive "
                                   "is damaged")
    return z


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
    for key, least in (("num_experts", 1), ("num_layers", 1), ("num_sequences", 0), ("num_rows", 0),
                       ("num_assignments", 0)):
        v = header[key]
        if not isinstance(v, int) or isinstance(v, bool) or v < least:
            raise TraceFormatError(f"{path}: header field {key} is {v!r}, expected an integer >= {least}")
    if not isinstance(header["columns"], dict):
        raise TraceFormatError(f"{path}: header field columns is not an object")
    dists = header.get("prefetch_distances", [])
    if not isinstance(dists, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1
                                              for d in dists):
        raise TraceFormatError(f"{path}: header field prefetch_distances is {dists!r}, expected integers >= 1")
    return header


def _check_sizes(z: zipfile.ZipFile, header: dict, path: Path) -> None:
    """Every column the header declares, before it is read: a plain numeric dtype, a 1-D shape, the
    length the header's counts imply where the format fixes one ((S,), (Q,) or (N,); other and
    unknown optional columns are bounded by their member alone), and array bytes its member really
    holds (whose size `_open` checked against the file's). The expert-id dtype must be the smallest
    unsigned type holding E - 1 (docs/trace-format.md), which ties num_experts to the file: uint8 ids
    mean E <= 256, uint16 E <= 65536."""
    E, S, Q, N = (header[k] for k in ("num_experts", "num_sequences", "num_rows", "num_assignments"))
    length = {"seq_tokens": S, "seq_domain": S, "row_experts": Q, "expert_ids": N, "expert_weights": N,
              "expert_iterations": N}
    members = {info.filename: info for info in z.infolist()}
    for name, spec in header["columns"].items():
        if not isinstance(spec, dict):
            raise TraceFormatError(f"{path}: header entry of column {name!r} is not an object")
        try:
            dtype = np.dtype(spec.get("dtype"))
        except TypeError:
            dtype = None
        if dtype is None or dtype.kind not in "iuf" or dtype.itemsize > 8:
            raise TraceFormatError(f"{path}: column {name!r} has dtype {spec.get('dtype')!r} in the header, "
                                   "expected a numpy integer or float type")
        shape = spec.get("shape")
        if not (isinstance(shape, list) and len(shape) == 1 and isinstance(shape[0], int) and shape[0] >= 0):
            raise TraceFormatError(f"{path}: column {name!r} has shape {shape!r} in the header, expected [length]")
        if name in length and shape[0] != length[name]:
            raise TraceFormatError(f"{path}: column {name!r} has shape {shape!r} in the header, expected "
                                   f"[{length[name]}] from the header's counts")
        info = members.get(f"{name}.npy")
        if info is None:
            raise TraceFormatError(f"{path}: member {name + '.npy'!r} is missing (the file is incomplete or not "
                                   "a routing trace)")
        nbytes = shape[0] * dtype.itemsize
        if not nbytes <= info.file_size <= nbytes + _NPY_HEADER_MAX:
            raise TraceFormatError(f"{path}: column {name!r} declares {shape[0]} values ({nbytes} bytes) but its "
                                   f"member holds {info.file_size} bytes; the header is damaged")
    ids = header["columns"].get("expert_ids")
    if ids is not None and np.dtype(ids["dtype"]) != _smallest_uint(E - 1):
        raise TraceFormatError(f"{path}: the header says num_experts = {E}, but expert ids are stored as "
                               f"{np.dtype(ids['dtype'])}, which a trace uses for E <= "
                               f"{np.iinfo(np.dtype(ids['dtype'])).max + 1} only (and the smallest type that fits); "
                               "the header is damaged")


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
        _check_sizes(z, header, path)
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


def _ragged_to_padded(values_N: np.ndarray, counts_Q: np.ndarray, T_S: np.ndarray, L: int, fill=-1,
                      dtype=np.int64) -> list[np.ndarray]:
    """Per sequence (L, T, K) arrays from a ragged column (rows in order, counts_Q entries each);
    K = the most entries of any row of that sequence."""
    K = int(counts_Q.max()) if counts_Q.size else 0
    start_Q = np.cumsum(counts_Q) - counts_Q
    row_N = np.repeat(np.arange(counts_Q.size), counts_Q)
    slot_N = np.arange(values_N.size) - start_Q[row_N]  # slot = index minus the row's first index
    out_QK = np.full((counts_Q.size, K), fill, dtype=dtype)
    out_QK[row_N, slot_N] = values_N
    seqs, r0 = [], 0
    for T in T_S:
        rows = int(L * T)
        k = int(counts_Q[r0:r0 + rows].max()) if rows else 0
        seqs.append(out_QK[r0:r0 + rows, :k].reshape(L, int(T), k))
        r0 += rows
    return seqs


def load_trace(path: str | os.PathLike) -> RoutingTrace:
    """Read a trace file written by `save_trace` (any violation raises TraceFormatError)."""
    path = Path(path)
    header = read_header(path)
    cols = _read_columns(path, header)
    E, L, S = header["num_experts"], header["num_layers"], header["num_sequences"]
    T_S = cols["seq_tokens"].astype(np.int64)
    counts_Q = cols["row_experts"].astype(np.int64)
    ids_N = cols["expert_ids"].astype(np.int64)

    def bad(msg: str) -> TraceFormatError:
        return TraceFormatError(f"{path}: inconsistent trace: {msg}")

    if T_S.size != S or cols["seq_domain"].size != S:
        raise bad(f"the header says {S} sequences, seq_tokens has {T_S.size}, seq_domain {cols['seq_domain'].size}")
    if counts_Q.size != int(L * T_S.sum()) or counts_Q.size != header["num_rows"]:
        raise bad(f"row_experts has {counts_Q.size} rows, expected layers x tokens = {int(L * T_S.sum())}")
    if int(counts_Q.sum()) != ids_N.size or ids_N.size != header["num_assignments"]:
        raise bad(f"row_experts sums to {int(counts_Q.sum())} but expert_ids has {ids_N.size} entries")
    if ids_N.size and ids_N.max() >= E:
        raise bad(f"expert id {int(ids_N.max())} >= num_experts {E}")
    if counts_Q.size and counts_Q.max() > E:
        raise bad(f"a row lists {int(counts_Q.max())} experts, more than num_experts {E}")
    domains = header.get("domains")
    dom_idx = cols["seq_domain"]
    labels = None
    if domains is not None:
        if dom_idx.size and (dom_idx.min() < 0 or dom_idx.max() >= len(domains)):
            raise bad(f"seq_domain indexes outside the {len(domains)} domain names")
        labels = [domains[i] for i in dom_idx]

    K = int(counts_Q.max()) if counts_Q.size else 0
    padded_arrays = 2 + ("expert_weights" in cols) + ("expert_iterations" in cols) + len(header.get("prefetch_distances", []))
    check_memory(padded_arrays * 8 * counts_Q.size * K, f"{path}: loading {counts_Q.size} rows x {K} slots")

    def padded(values_N: np.ndarray, fill, dtype) -> list[np.ndarray]:
        return _ragged_to_padded(values_N, counts_Q, T_S, L, fill, dtype)

    seqs = padded(ids_N, -1, np.int64)
    weights = padded(cols["expert_weights"], 0.0, np.float32) if "expert_weights" in cols else None
    iterations = padded(cols["expert_iterations"], 0, np.uint8) if "expert_iterations" in cols else None
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
        pred_Q = cols[rows_name].astype(np.int64)
        if pred_Q.size != counts_Q.size or int(pred_Q.sum()) != pred.size:
            raise bad(f"{rows_name} has {pred_Q.size} rows summing to {int(pred_Q.sum())}, expected "
                      f"{counts_Q.size} rows summing to the {pred.size} entries of {name}")
        if pred.size and pred.max() >= E:
            raise bad(f"{name} holds expert id {int(pred.max())} >= num_experts {E}")
        prefetch[int(d)] = _ragged_to_padded(pred, pred_Q, T_S, L)
    token_loss = None
    if "token_loss" in cols:
        loss = cols["token_loss"].astype(np.float32)
        if loss.size != int(T_S.sum()):
            raise bad(f"token_loss has {loss.size} entries for the {int(T_S.sum())} tokens of seq_tokens")
        token_loss = np.split(loss, np.cumsum(T_S)[:-1])
    try:
        return RoutingTrace(seqs, E, labels, weights, prefetch or None, header.get("layer_names"),
                            header.get("meta") or {}, token_loss=token_loss, iterations=iterations)
    except ValueError as e:
        raise bad(str(e)) from e
