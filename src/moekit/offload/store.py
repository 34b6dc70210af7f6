"""The expert store: every routed expert of every MoE layer on disk, readable one expert at a time.

Format "moekit-expert-store" version 1, version 2 for quantised experts (moekit.compress: per-tensor
dtypes, uint8 codes and fp32 scales, one width per store), version 3 for experts kept in a pretrained
bank's own format (a wrapped gpt-oss or Llama 4: transposed stacks, interleaved gate/up columns,
per-expert biases, clamped SwiGLU; "layout" and "activation_params" keys) and version 4 for experts of
different sizes (mixed widths: per-expert formats and `expert_nbytes`) or merged layers (per-layer
`expert_map`, router expert -> stored expert; moekit's own layout only); layers may hold different
expert counts (`experts_per_layer`, moekit.compress pruning per layer); docs/offload.md is the
specification. A directory:

    manifest.json            format, version, shapes, dtype, byte ranges and a sha256 per expert
    layer-000.safetensors    MoE layer 0: tensors e0.gate_up, e0.down, e1.gate_up, ... (e{i}.up: non-gated;
                             version 3: as the bank stores them, transposed or interleaved, then
                             e{i}.in_bias, e{i}.down_bias)
    layer-001.safetensors    ...
    dense.safetensors        moekit models only: every other weight, so that the model can be built
                             without ever materialising its experts (`load_dense_lm`)

Ownership: a store directory carries moekit's marker (`.moekit`, kind "store"). `write_store` replaces
only a marked store or an empty directory; anything else (a folder that merely holds a file called
manifest.json, or a store written before markers existed) is refused with NotOwnedError. Old unmarked
stores are still read.

Each layer file is a valid safetensors file (any safetensors reader opens it) written in expert
order, so that one expert's tensors are one contiguous byte range: expert e of layer l is the
`expert_nbytes` bytes (version 4: `layers[l].expert_nbytes[e]`) at `layers[l].experts[e].offset` of the layer's file, gate_up (or up) first
and down second. The header is padded with spaces so that the data starts on a 4096-byte boundary
(experts then start page-aligned whenever expert_nbytes is a multiple of 4096). The per-expert
sha256 covers exactly that byte range.

`ExpertStore` reads one expert with one `os.preadv` straight into the caller's buffer (no copy,
no memory map); when opened it checks every manifest field against the files' real sizes before
anything is allocated, and the safetensors headers (a truncated file is refused, naming the first
expert it cut off); it checks each expert's sha256 on its first read
(`verify="first"`), on every read (`"always"`) or never (`"never"`). Writes are atomic: the store
is written into a temporary directory (every file fsynced), which is renamed into place
(moekit.utils.io.atomic_dir); the temporary directories of killed writes are removed by the next
`write_store` to the same place.

Legend: L MoE layers, E experts per layer, D model dim, F expert hidden dim, S_e bytes per expert.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import struct
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moekit.errors import DataError, NotOwnedError
from moekit.experts import ExpertBank
from moekit.experts.bank import ExpertLayout as BankLayout
from moekit.layers.moe import MoELayer, moe_layer_names, moe_layers
from moekit.ops.ffn import ACTIVATIONS, Activation
from moekit.utils.io import (
    MARKER,
    TMP_TAG,
    atomic_dir,
    check_writable_dir,
    marker_kind,
    remove_debris,
    sha256_file,
)

__all__ = ["FORMAT", "VERSION", "ExpertStore", "ExpertStoreError", "bank_format", "check_store_target",
           "store_activation", "temporary_store_dir", "write_store"]

FORMAT = "moekit-expert-store"
VERSION = 1
QUANTIZED_VERSION = 2  # stores of quantised experts (moekit.compress): per-tensor dtypes and a "quantization" key
LAYOUT_VERSION = 3  # experts stored as a pretrained bank holds them: "layout" and "activation_params" keys
MIXED_VERSION = 4  # experts of different sizes (mixed widths) and merged layers: per-expert formats and sizes
VERSIONS = (VERSION, QUANTIZED_VERSION, LAYOUT_VERSION, MIXED_VERSION)
MANIFEST = "manifest.json"
DENSE = "dense.safetensors"
_ALIGN = 4096  # data start of every layer file: page-aligned expert reads
KIND = "store"  # ownership marker kind (moekit.utils.io)
VERIFY_MODES = ("first", "always", "never")

_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
              torch.uint8: "U8"}
_TORCH_DTYPES = {str(d).removeprefix("torch."): d for d in _ST_DTYPES}


class ExpertStoreError(DataError, RuntimeError):
    """A store that cannot be used: missing, another format or version, truncated, or corrupted."""


def _tensor_names(gated: bool, quantization: dict | None = None, bias: bool = False) -> tuple[str, ...]:
    first = "gate_up" if gated else "up"
    if quantization:  # group-wise int codes and their fp32 scales (moekit.compress.quantize)
        return (f"{first}.q", f"{first}.scale", "down.q", "down.scale")
    return (first, "down", "in_bias", "down_bias") if bias else (first, "down")


def _is_quantized(bank: nn.Module) -> bool:
    return hasattr(bank, "bits_E")  # moekit.compress.QuantizedExpertBank


def _expert_bits(bank: nn.Module) -> list[int | None]:
    """Each expert's weight width: its bits in a quantised bank (moekit.compress), None for a plain bank."""
    return list(bank.bits_E) if _is_quantized(bank) else [None] * bank.num_experts


def _format_name(bits: int | None) -> str:
    return "dense" if bits is None else f"int{bits}"


def _quantization(bank: nn.Module, layer: int) -> dict | None:
    """{"bits", "group_size"} of a bank quantised to one width, None for a plain bank; a bank of mixed
    widths raises (callers that can hold it - `write_store` - ask `_expert_bits` instead)."""
    if not _is_quantized(bank):
        return None
    widths = sorted(set(bank.bits_E))
    if len(widths) != 1:
        raise ValueError(f"MoE layer {layer} mixes expert widths {widths} bits")
    return {"bits": widths[0], "group_size": bank.group_size}


def bank_format(bank: nn.Module, layer: int = 0) -> dict[str, Any]:
    """How a bank's experts are stored and computed, as the manifest records it (version 3 keys): its
    `layout` (transposed stacks, interleaved gate/up columns, per-expert biases: moekit.experts.ExpertLayout)
    and `activation_params` (the clamped SwiGLU's limit, alpha, up offset). ValueError for what the store
    does not hold: separate gate/up stacks or flat 2-D stacks (DBRX)."""
    if _is_quantized(bank):
        return {"layout": dict(_PLAIN["layout"]), "activation_params": _activation_params(Activation(bank.activation))}
    lay = bank.layout
    if lay.split or lay.flat:
        raise ValueError(f"write_store: MoE layer {layer}'s experts are stored as {lay.describe()} stacks (DBRX), "
                         "which the expert store does not hold; expected one gate_up (or up) and one down stack")
    # Any other storage option (a layout field this store format does not know) is refused, not ignored.
    # Spare rows past the E experts (LongCat-Flash) are never read: rows 0..E-1 are the experts, stored as usual.
    unknown = [f.name for f in dataclasses.fields(lay) if f.name not in (*_LAYOUT_FIELDS, "split", "flat", "spare")
               and getattr(lay, f.name)]
    if unknown:
        raise ValueError(f"write_store: MoE layer {layer}'s experts are stored with {', '.join(unknown)} "
                         f"({lay.describe()}), which the expert store does not hold")
    return {"layout": {f: getattr(lay, f) for f in _LAYOUT_FIELDS}, "activation_params": _activation_params(bank.act)}


_LAYOUT_FIELDS = ("in_transposed", "out_transposed", "interleaved", "bias")  # what a version-3 store records


def _activation_params(act: Activation) -> dict[str, Any]:
    return {"limit": act.limit, "alpha": act.alpha, "up_offset": act.up_offset, "clamp_after": act.clamp_after}


_PLAIN = {"layout": {f: False for f in _LAYOUT_FIELDS}, "activation_params": _activation_params(Activation())}


def store_activation(m: dict[str, Any]) -> Activation:
    """The experts' Activation a manifest records (version 3: with its clamp settings and interleaving)."""
    params = m.get("activation_params") or _PLAIN["activation_params"]
    interleaved = bool((m.get("layout") or {}).get("interleaved", False))
    return Activation(m["activation"], params["limit"], params["alpha"], params["up_offset"], interleaved,
                      bool(params.get("clamp_after", False)))


def _expert_tensors(bank: nn.Module, e: int) -> list[torch.Tensor]:
    """Expert e's tensors as the bank stores them (views: transposed stacks stay transposed, biases last)."""
    if _is_quantized(bank):
        return [getattr(bank, f"{n}{e}") for n in ("w_in_q", "w_in_s", "down_q", "down_s")]
    first = bank.gate_up_proj if bank.act.gated else bank.up_proj
    tensors = [first[e], bank.down_proj[e]]
    if bank.layout.bias:
        tensors += [bank.in_proj_bias[e], bank.down_proj_bias[e]]
    return tensors


def _as_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of a CPU tensor (bf16 included), without a copy when it is contiguous."""
    t = t.detach().to("cpu").contiguous()
    return memoryview(t.view(torch.uint8).reshape(-1).numpy())


# ----------------------------------------------------------------------------- writing


def _write_layer_file(path: Path, bank: nn.Module, layer: int) -> dict[str, Any]:
    """One layer's experts as a safetensors file in expert order, each expert in its own format (its
    width, moekit.compress) and size; returns the manifest entry."""
    bits_E = _expert_bits(bank)
    bias = bank_format(bank, layer)["layout"]["bias"]
    E = bank.num_experts
    formats: dict[str, tuple] = {}  # name -> (tensor names, shapes, dtypes, sizes)
    for e in range(E):
        name = _format_name(bits_E[e])
        if name in formats:
            continue
        ts = _expert_tensors(bank, e)
        for t in ts:
            if t.dtype not in _ST_DTYPES:
                raise ValueError(f"write_store: expert dtype {t.dtype} is not supported; expected one of "
                                 f"{sorted(str(x) for x in _ST_DTYPES)}")
        q = None if bits_E[e] is None else {"bits": bits_E[e], "group_size": bank.group_size}
        formats[name] = (_tensor_names(Activation(bank.activation).gated, q, bias), [tuple(t.shape) for t in ts], [t.dtype for t in ts],
                         [t.numel() * t.element_size() for t in ts])
    nbytes_E = [sum(formats[_format_name(b)][3]) for b in bits_E]
    header: dict[str, Any] = {"__metadata__": {"format": FORMAT, "version": str(VERSION), "layer": str(layer)}}
    begin = 0
    for e in range(E):
        names, shapes, dtypes, sizes = formats[_format_name(bits_E[e])]
        for name, shape, size, d in zip(names, shapes, sizes, dtypes, strict=True):
            header[f"e{e}.{name}"] = {"dtype": _ST_DTYPES[d], "shape": list(shape),
                                      "data_offsets": [begin, begin + size]}
            begin += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    pad = (-(8 + len(raw))) % _ALIGN
    raw += b" " * pad  # safetensors allows trailing spaces in the header
    data_start = 8 + len(raw)
    experts = []
    offset = data_start
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for e in range(E):
            h = hashlib.sha256()
            for t in _expert_tensors(bank, e):
                b = _as_bytes(t)
                h.update(b)
                f.write(b)
            experts.append({"offset": offset, "sha256": h.hexdigest(), "format": _format_name(bits_E[e])})
            offset += nbytes_E[e]
    return {"index": layer, "file": path.name, "file_nbytes": offset, "data_start": data_start,
            "experts": experts, "expert_nbytes": nbytes_E, "_formats": formats}


def _tensor_entries(names, shapes, dtypes, sizes) -> list[dict[str, Any]]:
    tensors, offset = [], 0
    for name, shape, size, d in zip(names, shapes, sizes, dtypes, strict=True):
        tensors.append({"name": name, "shape": list(shape), "offset": offset, "nbytes": size,
                        "dtype": str(d).removeprefix("torch.")})
        offset += size
    return tensors


def _dense_state(model: nn.Module, expert_banks: list[nn.Module]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor of model.state_dict() except the routed experts; tied tensors stored once
    (aliases: name -> the stored name)."""
    skip = {id(p) for bank in expert_banks for p in (*bank.parameters(), *bank.buffers())}
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[int, int, tuple], str] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in skip:
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t.detach().to("cpu").contiguous()
    return tensors, aliases


def write_store(model: nn.Module, out_dir: str | os.PathLike, *, source: dict[str, Any] | None = None) -> Path:
    """Write every routed expert of every MoELayer of `model` into the store directory `out_dir`.

    Works for a moekit `MoELM` (then the other weights and the model config go into
    dense.safetensors too, for `load_dense_lm`) and for any module holding MoELayers, wrapped
    transformers models included. `source` is free-form JSON recorded in the manifest (e.g. the
    checkpoint it came from), so callers can tell whether a store is still current.
    The directory is replaced atomically; an existing directory that is not a store is refused.
    """
    from safetensors.torch import save_file

    from moekit.models.lm import MoELM

    out_dir = Path(out_dir)
    layers = moe_layers(model)
    if not layers:
        raise ValueError(f"write_store: {type(model).__name__} contains no moekit MoELayer")
    banks = []
    for i, layer in enumerate(layers):
        bank = layer.experts
        if not isinstance(bank, ExpertBank) and not _is_quantized(bank):
            raise ValueError(f"write_store: MoE layer {i} holds {type(bank).__name__}, not an ExpertBank with its "
                             "weights (is the model already offloaded?)")
        if getattr(getattr(bank, "act", None), "softcap", None) is not None:
            raise ValueError(f"write_store: MoE layer {i}'s experts use a softcapped SwiGLU ({bank.act.describe()}), which "
                             "the store's activation name cannot express")
        if getattr(getattr(bank, "layout", None), "listed", False):
            raise ValueError(f"write_store: MoE layer {i}'s experts are separate modules (ExpertLayout(listed=True), "
                             "e.g. a wrapped Switch Transformers model), which the store cannot express")
        if bank_format(bank, i) != bank_format(layers[0].experts):
            raise ValueError(f"write_store: MoE layer {i} stores or computes its experts otherwise than layer 0 "
                             f"({bank_format(bank, i)} vs {bank_format(layers[0].experts)}); the store holds one format")
        if any(t.is_meta for t in _expert_tensors(bank, 0)):
            raise ValueError(f"write_store: MoE layer {i}'s expert weights are on the meta device (not loaded)")
        banks.append(bank)
    maps = [None if m.expert_map_E is None else m.expert_map_E.tolist() for m in layers]
    bits = [_expert_bits(bank) for bank in banks]
    widths = {b for bits_E in bits for b in bits_E}
    if len(widths) > 1 and None in widths:
        raise ValueError("write_store: some MoE layers are quantised and others are not; quantise every layer")
    groups = {bank.group_size for bank in banks if _is_quantized(bank)}
    if len(groups) > 1:
        raise ValueError(f"write_store: MoE layers use different quantisation group sizes {sorted(groups)}")
    # Version 4 when experts differ in size (mixed widths) or layers were merged, 3 for a pretrained bank's own
    # layout; else the older versions, which older moekits read.
    fmt = bank_format(banks[0])
    version = MIXED_VERSION if len(widths) > 1 or any(m is not None for m in maps) else (
        QUANTIZED_VERSION if None not in widths else VERSION if fmt == _PLAIN else LAYOUT_VERSION)
    if version == MIXED_VERSION and fmt != _PLAIN:
        raise ValueError(f"write_store: mixed-width or merged experts in a bank's own layout ({fmt}) are not held; "
                         "version-4 stores hold moekit's standard layout only")
    check_store_target(out_dir)
    with atomic_dir(out_dir, KIND, "write_store") as tmp:
        entries = [_write_layer_file(tmp / f"layer-{i:03d}.safetensors", bank, i) for i, bank in enumerate(banks)]
        formats: dict[str, tuple] = {}
        for i, ent in enumerate(entries):
            for name, spec in ent["_formats"].items():
                if formats.setdefault(name, spec) != spec:
                    raise ValueError(f"write_store: MoE layer {i} has {name} experts of shapes {spec[1]} {spec[2]}, an "
                                     f"earlier layer {formats[name][1]} {formats[name][2]}; the store needs one shape "
                                     "per format")
        specs = {name: {"expert_nbytes": sum(spec[3]), "tensors": _tensor_entries(*spec)}
                 for name, spec in sorted(formats.items())}
        big = max(specs, key=lambda n: specs[n]["expert_nbytes"])
        dense = None
        if isinstance(model, MoELM):
            dense_tensors, aliases = _dense_state(model, banks)
            save_file(dense_tensors, str(tmp / DENSE))
            digest = sha256_file(tmp / DENSE)
            dense = {"file": DENSE, "sha256": digest, "aliases": aliases, "model_config": model.cfg.to_dict()}
        group = next(iter(groups), None)
        quant = None if None in widths else (
            {"group_size": group} if version == MIXED_VERSION else {"bits": widths.pop(), "group_size": group})
        layer_entries = []
        for ent, name, m in zip(entries, moe_layer_names(model), maps, strict=True):
            e = {k: v for k, v in ent.items() if not k.startswith("_")} | {"name": name}
            if version != MIXED_VERSION:  # versions 1 to 3: one format, one size
                del e["expert_nbytes"]
                e["experts"] = [{k: v for k, v in x.items() if k != "format"} for x in e["experts"]]
            elif m is not None:
                e["expert_map"] = m  # merged: router expert -> stored (bank) expert
            layer_entries.append(e)
        manifest = {
            "format": FORMAT, "version": version, "quantization": quant,
            "num_layers": len(banks), "num_experts": max(b.num_experts for b in banks), "d_model": banks[0].d_model,
            "d_expert": banks[0].d_expert, "activation": banks[0].activation,
            "dtype": specs[big]["tensors"][0]["dtype"],
            "expert_nbytes": specs[big]["expert_nbytes"],
            "tensors": specs[big]["tensors"],
            **(fmt if version == LAYOUT_VERSION else {}),
            "layers": layer_entries,
            "dense": dense,
            "source": source or {},
        }
        if version == MIXED_VERSION:
            manifest["formats"] = specs
        counts = [b.num_experts for b in banks]
        if len(set(counts)) > 1:  # pruned per layer (moekit.compress): num_experts is the largest
            manifest["experts_per_layer"] = counts
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    return out_dir


def check_store_target(out_dir: str | os.PathLike) -> None:
    """Refuse (NotOwnedError) to write a store into `out_dir` unless it is absent, empty or a store
    moekit marked as its own. A store written before ownership markers existed is refused with a hint
    (it can still be read)."""
    out_dir = Path(out_dir)
    if out_dir.is_dir() and marker_kind(out_dir) is None and _manifest_format(out_dir / MANIFEST) == FORMAT:
        raise NotOwnedError(f"write_store: {out_dir} is an expert store written by an older moekit, without the "
                            f"{MARKER} ownership marker, so moekit will not replace it (it can still be read); "
                            f"delete it yourself (rm -r {out_dir}) or choose another directory")
    check_writable_dir(out_dir, KIND, "write_store")


def temporary_store_dir() -> Path:
    """A fresh directory for a temporary store (generation of a transformers model without
    --expert-store): TMPDIR/moekit-offload-UID/.store-XXXX.tmp-PID. Those of killed processes (as big
    as the model's experts) are removed first; the caller removes its own when done."""
    root = Path(tempfile.gettempdir()) / f"moekit-offload-{os.getuid() if hasattr(os, 'getuid') else 0}"
    root.mkdir(mode=0o700, exist_ok=True)
    remove_debris(root)
    return Path(tempfile.mkdtemp(prefix=".store-", suffix=f"{TMP_TAG}{os.getpid()}", dir=root))


def _manifest_format(path: Path) -> str | None:
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return m.get("format") if isinstance(m, dict) else None


# ----------------------------------------------------------------------------- reading


def _is_int(v: Any, least: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= least


def _check_manifest(m: Any, man_path: Path) -> None:
    """Every manifest field the reader uses: present, of the right type, and consistent with the others
    (tensor sizes with shapes and dtype, expert offsets with the expert size, file sizes with both), so
    that checking each file's real size against `file_nbytes` bounds every read and allocation."""

    def bad(what: str) -> ExpertStoreError:
        return ExpertStoreError(f"{man_path}: {what}; the store is damaged or was not written by moekit "
                                "(rewrite it with `moekit offload` or write_store)")

    def need(obj: Any, key: str, ok, expected: str, where: str = "") -> Any:
        if not isinstance(obj, dict) or key not in obj:
            raise bad(f"key {where}{key!r} is missing")
        if not ok(obj[key]):
            raise bad(f"{where}{key} is {obj[key]!r}, expected {expected}")
        return obj[key]

    if not isinstance(m, dict):
        raise bad(f"holds a JSON {type(m).__name__}, expected an object")
    if m.get("format") != FORMAT:
        raise ExpertStoreError(f"{man_path}: format {m.get('format')!r}, expected {FORMAT!r}")
    if m.get("version") not in VERSIONS:
        raise ExpertStoreError(f"{man_path}: version {m.get('version')!r}, this moekit reads versions "
                               f"{', '.join(map(str, VERSIONS))}")
    version = m["version"]
    quant = m.get("quantization")
    if version != MIXED_VERSION and (quant is not None) != (version == QUANTIZED_VERSION):
        raise bad(f"version {version} with quantization {quant!r} (quantised stores are version {QUANTIZED_VERSION})")
    positive = (lambda v: _is_int(v, 1), "an integer >= 1")
    L = need(m, "num_layers", *positive)
    E = need(m, "num_experts", *positive)
    D = need(m, "d_model", *positive)
    F = need(m, "d_expert", *positive)
    activation = need(m, "activation", lambda v: v in ACTIVATIONS, f"one of {ACTIVATIONS}")
    G = None
    dtype = _TORCH_DTYPES[need(m, "dtype", lambda v: v in _TORCH_DTYPES, f"one of {sorted(_TORCH_DTYPES)}")]
    S = need(m, "expert_nbytes", *positive)
    layout = {f: False for f in _LAYOUT_FIELDS}
    if m["version"] == LAYOUT_VERSION:
        lay = need(m, "layout", lambda v: isinstance(v, dict) and set(v) == set(_LAYOUT_FIELDS)
                   and all(isinstance(x, bool) for x in v.values()), f"an object of booleans {_LAYOUT_FIELDS}")
        layout.update(lay)
        params = need(m, "activation_params", lambda v: isinstance(v, dict)
                      and {"limit", "alpha", "up_offset"} <= set(v) <= {"limit", "alpha", "up_offset", "clamp_after"},
                      "an object with limit, alpha, up_offset (and clamp_after)")
        try:
            store_activation(m)
        except (TypeError, ValueError) as e:
            raise bad(f"activation {activation!r} with {params} is not one moekit computes ({e})") from e
    gated = Activation(activation).gated
    X = 2 * F if gated else F
    if quant is not None:
        G = need(quant, "group_size", lambda v: _is_int(v, 1) and D % v == 0 and F % v == 0,
                 "a divisor of d_model and d_expert", "quantization.")

    def check_tensors(tensors: Any, bits: int | None, where: str) -> int:
        """The bytes of one expert of a format, after checking its tensor entries."""
        if bits is None:  # version 3: as the bank stores them (transposed, biases); else [X, D] and [D, F]
            shapes = ([D, X] if layout["in_transposed"] else [X, D], [F, D] if layout["out_transposed"] else [D, F])
            if layout["bias"]:
                shapes += ([X], [D])
            dtypes = (dtype,) * len(shapes)
        else:
            shapes = ([X, D * bits // 8], [X, D // G], [D, F * bits // 8], [D, F // G])
            dtypes = (torch.uint8, torch.float32, torch.uint8, torch.float32)
        names = _tensor_names(gated, None if bits is None else {"bits": bits}, layout["bias"])
        if not (isinstance(tensors, list) and len(tensors) == len(names)):
            raise bad(f"{where}tensors is {tensors!r}, expected a list of {len(names)} tensor entries")
        offset = 0
        for i, (t, name, shape, d) in enumerate(zip(tensors, names, shapes, dtypes, strict=True)):
            at = f"{where}tensors[{i}]."
            need(t, "name", lambda v, n=name: v == n, repr(name), at)
            need(t, "shape", lambda v, s=shape: v == s, f"{shape} (from d_model, d_expert and activation)", at)
            need(t, "offset", lambda v, o=offset: v == o, f"{offset} (tensors are contiguous)", at)
            nbytes = torch.empty((), dtype=d).element_size() * math.prod(shape)
            need(t, "nbytes", lambda v, n=nbytes: v == n, f"{nbytes} (shape x dtype size)", at)
            offset += nbytes
        return offset

    # Each format an expert may have: its name -> bytes per expert.
    if version == MIXED_VERSION:
        formats = need(m, "formats", lambda v: isinstance(v, dict) and v, "an object of expert formats")
        sizes: dict[str, int] = {}
        for name, spec in formats.items():
            if name == "dense":
                bits = None
            elif name in ("int2", "int4", "int8") and quant is not None:
                bits = int(name[3:])
            else:
                raise bad(f"formats has {name!r}, expected 'dense' (unquantised store) or int2/int4/int8 (quantised)")
            sizes[name] = check_tensors(need(spec, "tensors", lambda v: True, "", f"formats.{name}."), bits,
                                        f"formats.{name}.")
            need(spec, "expert_nbytes", lambda v, n=sizes[name]: v == n, f"{sizes[name]} (its tensors)",
                 f"formats.{name}.")
        if S != max(sizes.values()):
            raise bad(f"expert_nbytes is {S}, expected the largest format's {max(sizes.values())}")
        big = max(sizes, key=sizes.get)
        need(m, "tensors", lambda v, b=big: v == formats[b]["tensors"], f"the largest format's ({big}) tensors")
    else:
        bits = None if quant is None else need(quant, "bits", lambda v: v in (2, 4, 8), "2, 4 or 8", "quantization.")
        size = check_tensors(need(m, "tensors", lambda v: isinstance(v, list), "a list of tensor entries"), bits, "")
        if S != size:
            raise bad(f"expert_nbytes is {S}, but its tensors take {size} bytes")
        sizes = {_format_name(bits): size}
    counts = m.get("experts_per_layer", [E] * L)
    if not (isinstance(counts, list) and len(counts) == L and all(_is_int(c, 1) for c in counts) and max(counts) == E):
        raise bad(f"experts_per_layer is {counts!r}, expected {L} integers >= 1 whose largest is num_experts = {E}")
    layers = need(m, "layers", lambda v: isinstance(v, list) and len(v) == L, f"a list of num_layers = {L} entries")
    (only,) = sizes if version != MIXED_VERSION else (None,)
    for li, (layer, E) in enumerate(zip(layers, counts, strict=True)):
        where = f"layers[{li}]."
        need(layer, "index", lambda v, i=li: v == i, str(li), where)
        need(layer, "file", lambda v: isinstance(v, str) and v not in ("", ".", "..") and Path(v).name == v,
             "a file name inside the store", where)
        start = need(layer, "data_start", lambda v: _is_int(v, 8), "an integer >= 8", where)
        if version != MIXED_VERSION:  # one size: the file's size follows from the count alone
            need(layer, "file_nbytes", lambda v, n=start + E * S: v == n, f"data_start + E x expert_nbytes = "
                 f"{start + E * S}", where)
        experts = need(layer, "experts", lambda v, n=E: isinstance(v, list) and len(v) == n,
                       f"a list of the layer's {E} experts", where)
        fmts = [only] * E
        if version == MIXED_VERSION:
            fmts = [need(x, "format", lambda v: v in sizes, f"one of {sorted(sizes)}", f"{where}experts[{e}].")
                    for e, x in enumerate(experts)]
            want = [sizes[f] for f in fmts]
            need(layer, "expert_nbytes", lambda v, w=want: v == w, f"{want} (each expert's format size)", where)
            end = start + sum(want)
            need(layer, "file_nbytes", lambda v, n=end: v == n, f"data_start + the layer's expert bytes = {end}", where)
            if "expert_map" in layer:  # merged: every router expert sends its tokens to a stored expert
                need(layer, "expert_map", lambda v, n=E: isinstance(v, list) and v and all(
                    _is_int(x) and x < n for x in v), f"a list of stored expert ids 0..{E - 1}", where)
        offset = start
        for e, x in enumerate(experts):
            need(x, "offset", lambda v, o=offset: v == o, f"{offset}", f"{where}experts[{e}].")
            need(x, "sha256", lambda v: isinstance(v, str) and len(v) == 64, "a sha256 hex digest",
                 f"{where}experts[{e}].")
            offset += sizes[fmts[e]]
    dense = m.get("dense")
    if dense is not None:
        need(dense, "file", lambda v: isinstance(v, str) and v not in ("", ".", "..") and Path(v).name == v,
             "a file name inside the store", "dense.")
        need(dense, "sha256", lambda v: isinstance(v, str) and len(v) == 64, "a sha256 hex digest", "dense.")
        need(dense, "aliases", lambda v: isinstance(v, dict), "an object", "dense.")
        need(dense, "model_config", lambda v: isinstance(v, dict), "an object", "dense.")
    if not isinstance(m.get("source", {}), dict):
        raise bad(f"source is {m['source']!r}, expected an object")


@dataclass(frozen=True)
class ExpertLayout:
    """Where expert tensors lie inside one expert's byte range (the same for every expert)."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    offsets: tuple[int, ...]
    nbytes: tuple[int, ...]
    dtype: torch.dtype
    expert_nbytes: int
    dtypes: tuple[torch.dtype, ...] | None = None  # per tensor (quantised stores); None: all `dtype`

    def views(self, buf_u8: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The expert's tensors as views of a (expert_nbytes,) uint8 buffer (no copy)."""
        dtypes = self.dtypes or (self.dtype,) * len(self.names)
        return tuple(buf_u8[o:o + n].view(d).view(s)
                     for o, n, s, d in zip(self.offsets, self.nbytes, self.shapes, dtypes, strict=True))


class ExpertStore:
    """Read-only access to a store written by `write_store` (see the module doc).

    store.read_into(layer, expert, buf_u8)   fill a (expert_nbytes,) uint8 CPU tensor
    store.load(layer, expert)                a fresh (gate_up | up, down) pair, for inspection
    Thread-safe: reads are positional (`preadv`), the verified set is locked.
    """

    def __init__(self, path: str | os.PathLike, verify: str = "first"):
        if verify not in VERIFY_MODES:
            raise ValueError(f"ExpertStore: verify={verify!r}; allowed: {VERIFY_MODES}")
        self.path = Path(path)
        self.verify = verify
        man_path = self.path / MANIFEST
        if not man_path.is_file():
            raise ExpertStoreError(f"{self.path} is not an expert store: {MANIFEST} is missing (an interrupted "
                                   "write leaves no manifest); write it with moekit.offload.write_store")
        try:
            m = json.loads(man_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ExpertStoreError(f"{man_path} is not valid JSON ({e}); the store is damaged") from e
        _check_manifest(m, man_path)
        self.manifest = m
        self.num_layers: int = m["num_layers"]
        self.num_experts: int = m["num_experts"]  # the largest layer's (experts_per_layer: each layer's)
        self.experts_per_layer: list[int] = m.get("experts_per_layer", [self.num_experts] * self.num_layers)
        self.activation: str = m["activation"]
        # How the experts are computed and stored (version 3: a pretrained bank's own format; else moekit's).
        self.act: Activation = store_activation(m)
        self.bank_layout = BankLayout(**(m.get("layout") or _PLAIN["layout"]))
        self.d_model: int = m["d_model"]
        self.d_expert: int = m["d_expert"]
        self.expert_nbytes: int = m["expert_nbytes"]
        self.dtype: torch.dtype = _TORCH_DTYPES[m["dtype"]]
        # {"bits", "group_size"} of a store of quantised experts (moekit.compress), else None.
        self.quantization: dict | None = m.get("quantization")
        # Each expert format (version 4: "dense", "int4", "int8", ...; older stores one) as an ExpertLayout.
        specs = m.get("formats") or {_format_name(None if self.quantization is None else self.quantization["bits"]):
                                     {"tensors": m["tensors"], "expert_nbytes": self.expert_nbytes}}
        self.layouts: dict[str, ExpertLayout] = {}
        for name, spec in specs.items():
            t = spec["tensors"]
            dtypes = tuple(_TORCH_DTYPES[x["dtype"]] for x in t) if name != "dense" else None
            self.layouts[name] = ExpertLayout(tuple(x["name"] for x in t), tuple(tuple(x["shape"]) for x in t),
                                              tuple(x["offset"] for x in t), tuple(x["nbytes"] for x in t),
                                              self.dtype, spec["expert_nbytes"], dtypes)
        (only,) = specs if len(specs) == 1 else (None,)
        self.expert_format_LE: list[list[str]] = [[x.get("format", only) for x in layer["experts"]]
                                                  for layer in m["layers"]]
        # S_e of each expert: mixed widths give experts of different sizes (the budget counts each one's own).
        self.expert_nbytes_LE: list[list[int]] = [[self.layouts[f].expert_nbytes for f in row]
                                                  for row in self.expert_format_LE]
        # Merged layers (moekit.compress.merge): router expert -> stored expert; None: the identity.
        self.expert_maps: list[list[int] | None] = [layer.get("expert_map") for layer in m["layers"]]
        self.layout = self.layouts[max(self.layouts, key=lambda n: self.layouts[n].expert_nbytes)]  # the largest
        self._verified: set[tuple[int, int]] = set()
        self._lock = threading.Lock()
        self._fds: list[int] = []
        try:
            for layer in m["layers"]:
                self._fds.append(self._open_layer(layer))
        except BaseException:
            self.close()
            raise

    def _open_layer(self, layer: dict[str, Any]) -> int:
        """Open one layer file after checking its real size against the (already consistent) manifest."""
        path = self.path / layer["file"]
        li = layer["index"]
        if not path.is_file():
            raise ExpertStoreError(f"expert store {self.path}: {layer['file']} (MoE layer {li}) is missing")
        size = path.stat().st_size
        if size < layer["file_nbytes"]:
            cut = [e for e, x in enumerate(layer["experts"])
                   if x["offset"] + self.expert_nbytes_LE[li][e] > size]
            raise ExpertStoreError(
                f"expert store {self.path}: {layer['file']} is truncated ({size} bytes, expected "
                f"{layer['file_nbytes']}): layer {li} expert {cut[0]} (and {len(cut) - 1} more) lie past its end; "
                "rewrite the store with write_store")
        if size > layer["file_nbytes"]:
            raise ExpertStoreError(f"expert store {self.path}: {layer['file']} has {size} bytes, expected "
                                   f"{layer['file_nbytes']}: not the file the manifest describes")
        fd = os.open(path, os.O_RDONLY)
        try:
            self._check_header(fd, layer)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _check_header(self, fd: int, layer: dict[str, Any]) -> None:
        """The safetensors header must place every tensor where the manifest says."""
        where = f"expert store {self.path}: {layer['file']} (MoE layer {layer['index']})"
        try:
            (n,) = struct.unpack("<Q", os.pread(fd, 8, 0))
            if 8 + n != layer["data_start"]:
                raise ValueError(f"header length {n} does not match the manifest's data start {layer['data_start']}")
            header = json.loads(os.pread(fd, n, 8))
        except (struct.error, ValueError, UnicodeDecodeError) as e:
            raise ExpertStoreError(f"{where} has a damaged safetensors header ({e})") from e
        base = layer["data_start"]
        for e, x in enumerate(layer["experts"]):
            lay = self.layouts[self.expert_format_LE[layer["index"]][e]]
            for name, off, nb in zip(lay.names, lay.offsets, lay.nbytes, strict=True):
                entry = header.get(f"e{e}.{name}")
                want = [x["offset"] - base + off, x["offset"] - base + off + nb]
                if entry is None or entry.get("data_offsets") != want:
                    raise ExpertStoreError(f"{where}: tensor e{e}.{name} (layer {layer['index']} expert {e}) is not "
                                           "where the manifest says; the file does not belong to this manifest")

    def __enter__(self) -> ExpertStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        fds, self._fds = self._fds, []
        for fd in fds:
            os.close(fd)

    def __repr__(self) -> str:
        return (f"ExpertStore({str(self.path)!r}, L={self.num_layers}, E={self.num_experts}, "
                f"{self.activation}, {self.manifest['dtype']}, {self.expert_nbytes / 2**20:.2f} MiB/expert)")

    @property
    def total_nbytes(self) -> int:
        """Bytes of all routed experts."""
        return sum(map(sum, self.expert_nbytes_LE))

    @property
    def uniform(self) -> bool:
        """Whether every expert has the same size (no mixed widths)."""
        return len(self.layouts) == 1

    def expert_bits(self, layer: int, expert: int) -> int | None:
        """The width of a stored expert (quantised stores), None for an unquantised one."""
        f = self.expert_format_LE[layer][expert]
        return None if f == "dense" else int(f[3:])

    def layout_of(self, layer: int, expert: int) -> ExpertLayout:
        return self.layouts[self.expert_format_LE[layer][expert]]

    def _check_index(self, layer: int, expert: int) -> None:
        if not (0 <= layer < self.num_layers and 0 <= expert < self.experts_per_layer[layer]):
            raise IndexError(f"expert store has layers 0..{self.num_layers - 1} and experts 0..{self.num_experts - 1}"
                             f"{'' if layer >= self.num_layers else f' (layer {layer}: {self.experts_per_layer[layer]})'}, "
                             f"asked for layer {layer} expert {expert}")
        if not self._fds:
            raise ExpertStoreError(f"expert store {self.path} is closed")

    def read_into(self, layer: int, expert: int, buf_u8: torch.Tensor) -> None:
        """Read expert `expert` of MoE layer `layer` into `buf_u8` ((S_e,) uint8, CPU, contiguous, S_e =
        expert_nbytes_LE[layer][expert]) with one positional read; check its sha256 as `verify` says."""
        self._check_index(layer, expert)
        S = self.expert_nbytes_LE[layer][expert]
        if buf_u8.dtype != torch.uint8 or buf_u8.numel() != S or not buf_u8.is_contiguous():
            raise ValueError(f"read_into: need a contiguous uint8 buffer of {S} bytes, got "
                             f"{buf_u8.dtype} {tuple(buf_u8.shape)}")
        info = self.manifest["layers"][layer]
        mv = memoryview(buf_u8.numpy())
        got = os.preadv(self._fds[layer], [mv], info["experts"][expert]["offset"])
        if got != S:
            raise ExpertStoreError(f"expert store {self.path}: layer {layer} expert {expert} is truncated in "
                                   f"{info['file']} (read {got} of {S} bytes); rewrite the store")
        if self.verify == "never" or (self.verify == "first" and (layer, expert) in self._verified):
            return
        digest = hashlib.sha256(mv).hexdigest()
        if digest != info["experts"][expert]["sha256"]:
            raise ExpertStoreError(f"expert store {self.path}: layer {layer} expert {expert} in {info['file']} fails "
                                   f"its checksum (sha256 {digest[:16]}..., manifest {info['experts'][expert]['sha256'][:16]}...): "
                                   "the file is corrupted; rewrite the store with write_store")
        with self._lock:
            self._verified.add((layer, expert))

    def load(self, layer: int, expert: int) -> tuple[torch.Tensor, ...]:
        """A freshly allocated copy of one expert's tensors (gate_up | up, down)."""
        self._check_index(layer, expert)
        buf = torch.empty(self.expert_nbytes_LE[layer][expert], dtype=torch.uint8)
        self.read_into(layer, expert, buf)
        return self.layout_of(layer, expert).views(buf)

    def verify_all(self) -> None:
        """Read and checksum every expert (a full scan); raises on the first bad one."""
        saved, self.verify = self.verify, "always"
        try:
            for layer in range(self.num_layers):
                for e in range(self.experts_per_layer[layer]):
                    self.read_into(layer, e, torch.empty(self.expert_nbytes_LE[layer][e], dtype=torch.uint8))
        finally:
            self.verify = saved

    def check_matches(self, layers: list[MoELayer]) -> None:
        """Refuse a store whose shapes, merges or widths differ from the model's MoE layers."""
        if len(layers) != self.num_layers:
            raise ExpertStoreError(f"expert store {self.path} has {self.num_layers} MoE layers, the model has {len(layers)}")
        for i, layer in enumerate(layers):
            cfg = layer.cfg
            got = (layer.experts.num_experts, cfg.expert_dim, cfg.d_expert, cfg.activation)
            want = (self.experts_per_layer[i], self.d_model, self.d_expert, self.activation)
            if got != want:
                raise ExpertStoreError(f"expert store {self.path} holds experts (E, D, F, activation) = {want}, "
                                       f"MoE layer {i} of the model has {got}")
            mine_map = None if layer.expert_map_E is None else layer.expert_map_E.tolist()
            if mine_map != self.expert_maps[i]:
                raise ExpertStoreError(f"expert store {self.path}: MoE layer {i}'s experts are "
                                       f"{'merged' if self.expert_maps[i] is not None else 'not merged'} in the store "
                                       f"(expert map {self.expert_maps[i]}), the model's map is {mine_map}")
            bank = layer.experts
            fmt = bank_format(bank, i)
            mine = (fmt["layout"], fmt["activation_params"])
            theirs = ({f: getattr(self.bank_layout, f) for f in _LAYOUT_FIELDS}, _activation_params(self.act))
            if mine != theirs:
                raise ExpertStoreError(f"expert store {self.path} holds experts stored as {theirs[0]} with activation "
                                       f"{self.act.describe()}, MoE layer {i} of the model has {mine[0]}, "
                                       f"{bank.act.describe() if hasattr(bank, 'act') else bank.activation}")
            if any(t.is_meta for t in _expert_tensors(bank, 0)):
                continue  # a model built without its experts (load_dense_lm): the store says what they are
            mine = _expert_bits(bank)
            stored = [self.expert_bits(i, e) for e in range(self.experts_per_layer[i])]
            if mine != stored:
                raise ExpertStoreError(f"expert store {self.path} holds MoE layer {i}'s experts at widths {stored} "
                                       f"(None: unquantised), the model has {mine}")

def __getattr__(name: str):
    # load_dense_lm (building a model from a store) moved to moekit.offload.load; still importable from here.
    if name == "load_dense_lm":
        from moekit.offload.load import load_dense_lm

        return load_dense_lm
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
