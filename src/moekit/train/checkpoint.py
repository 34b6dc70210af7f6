"""Checkpoints: safetensors weights and optimiser state + config.json + meta.json, written atomically.

Layout of a run directory:
    RUN/config.json                      resolved configuration (model, train, tokenizer)
    RUN/metrics.jsonl                    one JSON line per optimiser step (and per evaluation)
    RUN/checkpoints/step-00000100/       model.safetensors, optimizer.safetensors, config.json, meta.json
    RUN/checkpoints/LATEST               name of the newest complete checkpoint

A checkpoint is written into a temporary directory (each file fsynced), renamed into place, and only
then named in LATEST (temporary file, fsync, rename). A process killed at any point leaves the
previous checkpoint loadable. meta.json records every file's sha256, checked on load.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from moekit.utils.io import atomic_write_text, sha256_file
from moekit.utils.io import fsync_dir as _fsync_dir
from moekit.utils.io import fsync_file as _fsync_file

CHECKPOINT_DIR = "checkpoints"
LATEST = "LATEST"
FILES = ("model.safetensors", "optimizer.safetensors", "config.json")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or damaged."""


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


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = optimizer.state_dict()
    tensors = {}
    for pid, state in sd["state"].items():
        for key, value in state.items():
            tensors[f"{pid}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return tensors, {"param_groups": sd["param_groups"]}


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    config: dict[str, Any], meta: dict[str, Any], keep: int = 2,
                    pause_for_test: float = 0.0) -> Path:
    """Write checkpoint `step` atomically and point LATEST at it; keep the newest `keep` ones."""
    root = Path(run_dir) / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:08d}"
    final = root / name
    tmp = root / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_model(model, str(tmp / "model.safetensors"))  # handles tied weights
    opt_tensors, opt_meta = _optimizer_tensors(optimizer)
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    if pause_for_test:  # tests kill the process here, with half a checkpoint on disk
        import time

        time.sleep(pause_for_test)
    (tmp / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    meta = {**meta, "step": step, "optimizer": opt_meta,
            "sha256": {f: sha256_file(tmp / f) for f in FILES}}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
    for f in (*FILES, "meta.json"):
        _fsync_file(tmp / f)
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    atomic_write_text(root / LATEST, name + "\n")
    old = sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep]
    for p in old:
        shutil.rmtree(p, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path:
    root = Path(run_dir) / CHECKPOINT_DIR
    pointer = root / LATEST
    if not pointer.is_file():
        raise CheckpointError(f"no checkpoint in {run_dir}: {pointer} does not exist")
    path = root / pointer.read_text(encoding="utf-8").strip()
    if not path.is_dir():
        raise CheckpointError(f"{pointer} names {path.name}, which does not exist")
    return path


def read_meta(ckpt: Path) -> dict[str, Any]:
    """meta.json, after checking every file of the checkpoint against its recorded sha256."""
    meta_path = Path(ckpt) / "meta.json"
    if not meta_path.is_file():
        raise CheckpointError(f"checkpoint {ckpt} is incomplete: meta.json is missing")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    for f, digest in meta["sha256"].items():
        path = Path(ckpt) / f
        if not path.is_file():
            raise CheckpointError(f"checkpoint {ckpt} is incomplete: {f} is missing")
        if sha256_file(path) != digest:
            raise CheckpointError(f"checkpoint file {path} is damaged: its sha256 does not match meta.json")
    return meta


def load_model_weights(ckpt: Path, model: torch.nn.Module) -> None:
    load_model(model, str(Path(ckpt) / "model.safetensors"), strict=True)


def load_optimizer(ckpt: Path, optimizer: torch.optim.Optimizer, meta: dict[str, Any]) -> None:
    tensors = load_file(str(Path(ckpt) / "optimizer.safetensors"))
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["optimizer"]["param_groups"]})
