"""Checkpoints: safetensors weights and optimiser state + config.json + meta.json, written atomically.

Layout of a run directory:
    RUN/.moekit                          ownership marker (kind "run"); RUN/.moekit.lock: the writer's lock
    RUN/config.json                      resolved configuration (model, train), with its own checksum
    RUN/metrics.jsonl                    one JSON line per optimiser step (and per evaluation)
    RUN/checkpoints/step-00000100/       model.safetensors, optimizer.safetensors, config.json, meta.json
    RUN/checkpoints/LATEST               the newest complete checkpoint and meta.json's sha256, with a checksum

A checkpoint is written into a temporary directory (each file fsynced), renamed into place, and only
then named in LATEST (temporary file, fsync, rename). A process killed at any point leaves the
previous checkpoint loadable; a write that fails (a full disk) removes its temporary directory and
raises `WriteError`. Everything read back is verified: LATEST and meta.json by their own checksums,
meta.json also by the sha256 LATEST records, and every other file of the checkpoint by the sha256
meta.json records. Files written before checksums existed are read unverified, with one warning.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model

from moekit.errors import DataError, MoekitError
from moekit.utils.io import atomic_dir, atomic_write_text, sha256_bytes, sha256_file

CHECKPOINT_DIR = "checkpoints"
LATEST = "LATEST"
FILES = ("model.safetensors", "optimizer.safetensors", "config.json")
CHECKSUM = "checksum"  # key of a JSON file's own sha256 (over its other keys, canonically dumped)
_NAME = re.compile(r"step-\d{8}")


class CheckpointError(DataError):
    """A checkpoint is missing, incomplete or damaged."""


class WriteError(MoekitError):
    """A file of a run could not be written (e.g. the disk is full); nothing partial was left."""


def one_line(e: BaseException) -> str:
    """An exception's message on one line (safetensors' errors span several)."""
    text = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
    return " ".join(text.split()) or type(e).__name__


# ----------------------------------------------------------------------------- checksummed JSON


def _digest(obj: dict[str, Any]) -> str:
    return sha256_bytes(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode("utf-8"))


def write_json(path: str | os.PathLike, obj: dict[str, Any]) -> None:
    """Write `obj` atomically as JSON with a `checksum` key: the sha256 of its other keys."""
    atomic_write_text(path, json.dumps({**obj, CHECKSUM: _digest(obj)}, indent=2) + "\n")


_warned_unverified = False


def _warn_unverified(path: Path) -> None:
    global _warned_unverified
    if not _warned_unverified:
        _warned_unverified = True
        warnings.warn(f"{path} carries no checksum (written by an older moekit): it and other such files are read "
                      "unverified; resuming the run rewrites them with checksums", stacklevel=3)


def read_json(path: str | os.PathLike, checked: bool = True, required: bool = False) -> dict[str, Any]:
    """A JSON object from `path`, verified against its `checksum` key when `checked`. A file without
    one (written by an older moekit) is accepted with a one-time warning, or refused if `required`.

    Raises DataError naming the file when it is not UTF-8, not JSON, truncated, not an object or
    does not match its checksum; FileNotFoundError when it is missing.
    """
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise DataError(f"{path} is damaged: it is not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is damaged or truncated: not valid JSON ({e.msg} at line {e.lineno}, "
                        f"column {e.colno})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path} is damaged: expected a JSON object, found {type(obj).__name__}")
    if checked:
        digest = obj.pop(CHECKSUM, None)
        if digest is None and required:
            raise DataError(f"{path} is damaged: its checksum is missing")
        if digest is None:
            _warn_unverified(path)
        elif digest != _digest(obj):
            raise DataError(f"{path} is damaged: its content does not match its checksum")
    return obj


# ----------------------------------------------------------------------------- RNG and optimiser state


def rng_state() -> dict[str, str]:
    """Every RNG the training step draws from, as text (torch CPU, and CUDA when present)."""
    state = {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    if torch.cuda.is_available():
        state["cuda"] = [base64.b64encode(s.numpy().tobytes()).decode() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)
                                      for s in state["cuda"]])


def _optimizer_tensors(optimizer: torch.optim.Optimizer | dict) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = optimizer if isinstance(optimizer, dict) else optimizer.state_dict()
    tensors = {}
    for pid, state in sd["state"].items():
        for key, value in state.items():
            tensors[f"{pid}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return tensors, {"param_groups": sd["param_groups"]}


# ----------------------------------------------------------------------------- writing


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | dict | None,
                    config: dict[str, Any], meta: dict[str, Any], keep: int = 2,
                    pause_for_test: float = 0.0) -> Path:
    """Write checkpoint `step` atomically and point LATEST at it; keep the newest `keep` ones.
    `optimizer`: the optimiser, or a state dict of one (a consolidated one, see moekit.parallel).

    Raises WriteError (after removing the temporary directory) when a file cannot be written.
    """
    root = Path(run_dir) / CHECKPOINT_DIR
    name = f"step-{step:08d}"
    final = root / name
    try:
        # Built in .step-XXXXXXXX.tmp-PID (removed by the next start if this process dies), then one rename.
        with atomic_dir(final, None) as tmp:
            save_model(model, str(tmp / "model.safetensors"))  # handles tied weights
            # No optimiser (a compressed model, saved for inference): an empty optimizer file.
            opt_tensors, opt_meta = _optimizer_tensors(optimizer) if optimizer is not None else ({}, {"param_groups": []})
            save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
            if pause_for_test:  # tests kill the process here, with half a checkpoint on disk
                import time

                time.sleep(pause_for_test)
            (tmp / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
            meta = {**meta, "step": step, "optimizer": opt_meta, "sha256": {f: sha256_file(tmp / f) for f in FILES}}
            write_json(tmp / "meta.json", meta)
        write_json(root / LATEST, {"checkpoint": name, "meta_sha256": sha256_file(final / "meta.json")})
    except (OSError, SafetensorError) as e:
        raise WriteError(f"cannot write checkpoint {name} in {root}: {one_line(e)}; the previous checkpoint "
                         "is intact") from e
    # A later step than this one is from an abandoned attempt (LATEST never named it): not a keeper.
    stale = [p for p in root.glob("step-*") if p.is_dir() and p.name > name]
    old = sorted(p for p in root.glob("step-*") if p.is_dir() and p.name <= name)[:-keep]
    for p in stale + old:
        shutil.rmtree(p, ignore_errors=True)
    return final


# ----------------------------------------------------------------------------- reading


def has_checkpoint(run_dir: Path) -> bool:
    return (Path(run_dir) / CHECKPOINT_DIR / LATEST).is_file()


def latest_checkpoint(run_dir: Path) -> Path:
    """The checkpoint LATEST names, after checking LATEST (checksum, name) and that the checkpoint's
    meta.json is the one LATEST recorded. Raises CheckpointError (a DataError) otherwise."""
    root = Path(run_dir) / CHECKPOINT_DIR
    pointer = root / LATEST
    if not pointer.is_file():
        raise CheckpointError(f"no checkpoint in {run_dir}: {pointer} does not exist")
    try:
        text = pointer.read_bytes().decode("utf-8").strip()
    except UnicodeDecodeError:
        raise CheckpointError(f"{pointer} is damaged: it is not text") from None
    expected = "the name of a checkpoint, e.g. step-00000100"
    if not text:
        raise CheckpointError(f"{pointer} is empty; expected {expected}")
    meta_sha = None
    if text.startswith("{"):  # older moekits wrote the bare name; every JSON LATEST has a checksum
        latest = read_json(pointer, required=True)
        name, meta_sha = latest.get("checkpoint"), latest.get("meta_sha256")
    else:
        name = text
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise CheckpointError(f"{pointer} is damaged: it names {str(name)[:40]!r}; expected {expected}")
    if meta_sha is None:
        _warn_unverified(pointer)
    path = root / name
    if not path.is_dir():
        raise CheckpointError(f"{pointer} names {name}, which does not exist")
    if meta_sha is not None:
        meta_path = path / "meta.json"
        if not meta_path.is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: meta.json is missing")
        if sha256_file(meta_path) != meta_sha:
            raise CheckpointError(f"{meta_path} is damaged: its sha256 does not match the one {pointer} records")
    return path


def read_meta(ckpt: Path) -> dict[str, Any]:
    """meta.json (checksum verified), after checking every file of the checkpoint against its sha256."""
    meta_path = Path(ckpt) / "meta.json"
    if not meta_path.is_file():
        raise CheckpointError(f"checkpoint {ckpt} is incomplete: meta.json is missing")
    meta = read_json(meta_path)
    digests = meta.get("sha256")
    if not isinstance(digests, dict) or not isinstance(meta.get("step"), int):
        raise CheckpointError(f"{meta_path} is damaged: it lacks the step or the files' sha256")
    for f, digest in digests.items():
        path = Path(ckpt) / f
        if not path.is_file():
            raise CheckpointError(f"checkpoint {ckpt} is incomplete: {f} is missing")
        if sha256_file(path) != digest:
            raise CheckpointError(f"checkpoint file {path} is damaged: its sha256 does not match meta.json")
    return meta


def read_config(ckpt: Path) -> dict[str, Any]:
    """The checkpoint's own config.json, verified through meta.json."""
    meta = read_meta(ckpt)
    if "config.json" not in meta["sha256"]:
        raise CheckpointError(f"checkpoint {ckpt} is incomplete: meta.json records no config.json")
    return read_json(Path(ckpt) / "config.json", checked=False)  # its sha256 is in meta.json


def load_model_weights(ckpt: Path, model: torch.nn.Module) -> None:
    load_model(model, str(Path(ckpt) / "model.safetensors"), strict=True)


def read_optimizer_state(ckpt: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint's optimiser state dict (as `optimizer.state_dict()` gives it)."""
    tensors = load_file(str(Path(ckpt) / "optimizer.safetensors"))
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    return {"state": state, "param_groups": meta["optimizer"]["param_groups"]}


def load_optimizer(ckpt: Path, optimizer: torch.optim.Optimizer, meta: dict[str, Any]) -> None:
    optimizer.load_state_dict(read_optimizer_state(ckpt, meta))
