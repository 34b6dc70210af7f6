"""Models for offloaded inference: open a model and its expert store, building a moekit model
from a store without ever allocating its experts.

  load_dense_lm(store)                 the MoELM of a store written from one, experts on the meta device
  open_model_and_store(model_or_run)   (model, store directory, temporary?) for offloaded_generate: a
                                       module (its store written once), a moekit run directory (its
                                       store RUN/expert-store, rewritten when the checkpoint changes) or
                                       a store directory
  store_matches_model(store, model)    a cheap check that a store holds these weights
  run_source(run_dir)                  what a run's store is written from (its latest checkpoint)
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moekit.experts import ExpertBank
from moekit.layers import moe_layers
from moekit.offload.store import (
    MANIFEST,
    ExpertStore,
    ExpertStoreError,
    _as_bytes,
    _expert_tensors,
    check_store_target,
    temporary_store_dir,
    write_store,
)

__all__ = ["load_dense_lm", "open_model_and_store", "run_source", "store_matches_model"]


def load_dense_lm(store: str | os.PathLike | ExpertStore) -> nn.Module:
    """The moekit `MoELM` of a store written from one, built without allocating its experts: every
    non-expert weight comes from dense.safetensors and every ExpertBank stays on the meta device
    (attach the store with `moekit.offload.offload` before running it)."""
    from safetensors.torch import load_file

    from moekit.models.lm import LMConfig, MoELM

    st = store if isinstance(store, ExpertStore) else ExpertStore(store)
    dense = st.manifest.get("dense")
    if not dense:
        raise ExpertStoreError(f"expert store {st.path} holds experts only (written from a {st.manifest['source'].get('kind', 'non-moekit')} "
                               "model): load the model itself, then attach the store with moekit.offload.offload")
    cfg = LMConfig.from_dict(dense["model_config"])
    with torch.device("meta"):
        model = MoELM(cfg)
    # Materialise everything but the experts; non-persistent buffers are routing statistics (zeros).
    for module in model.modules():
        if isinstance(module, ExpertBank):
            continue
        for name, p in list(module.named_parameters(recurse=False)):
            setattr(module, name, nn.Parameter(torch.empty(p.shape, dtype=p.dtype), requires_grad=p.requires_grad))
        for name, b in list(module.named_buffers(recurse=False)):
            module._buffers[name] = torch.zeros(b.shape, dtype=b.dtype)
    for layer, M, m in zip(moe_layers(model), st.experts_per_layer, st.expert_maps, strict=True):
        if m is not None:  # merged (moekit.compress.merge): a bank of the M stored experts; the map as stored
            bank = layer.experts
            with torch.device("meta"):
                layer.experts = ExpertBank(M, bank.d_model, bank.d_expert, bank.activation)
            layer.expert_map_E = torch.tensor(m, dtype=torch.long)
    path = st.path / dense["file"]
    with open(path, "rb") as f:
        if hashlib.file_digest(f, "sha256").hexdigest() != dense["sha256"]:
            raise ExpertStoreError(f"expert store {st.path}: {dense['file']} fails its checksum; rewrite the store")
    state = load_file(str(path))
    expert_keys = {f"{name}.{p}" for name, m in model.named_modules() if isinstance(m, ExpertBank)
                   for p, _ in m.named_parameters()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    left = sorted(set(missing) - expert_keys - set(dense["aliases"]))
    if left or unexpected:
        raise ExpertStoreError(f"expert store {st.path}: {dense['file']} does not fit the model config "
                               f"(missing {left[:5]}, unexpected {list(unexpected)[:5]})")
    for alias, target in dense["aliases"].items():
        owner_name, _, leaf = alias.rpartition(".")
        t_owner, _, t_leaf = target.rpartition(".")
        setattr(model.get_submodule(owner_name), leaf, getattr(model.get_submodule(t_owner), t_leaf))
    if not isinstance(store, ExpertStore):
        st.close()
    return model.eval()


def store_matches_model(store: ExpertStore, model: nn.Module) -> bool:
    """Shapes match and the first and last expert of every layer have the stored bytes (a cheap
    check that the store was written from these weights)."""
    layers = moe_layers(model)
    try:
        store.check_matches(layers)
    except Exception:  # any mismatch means "not this model's store"
        return False
    for i, layer in enumerate(layers):
        for e in {0, store.experts_per_layer[i] - 1}:
            h = hashlib.sha256()
            for t in _expert_tensors(layer.experts, e):
                h.update(_as_bytes(t))
            if h.hexdigest() != store.manifest["layers"][i]["experts"][e]["sha256"]:
                return False
    return True


def run_source(run_dir: Path) -> dict[str, Any]:
    """What a run's store is written from: the latest checkpoint and its weights' sha256, read through
    the checkpoint module (which verifies meta.json and the files it lists)."""
    from moekit.train.checkpoint import latest_checkpoint, read_meta

    ckpt = latest_checkpoint(run_dir)
    meta = read_meta(ckpt)
    return {"kind": "moekit-run", "checkpoint": ckpt.name, "model_sha256": meta["sha256"]["model.safetensors"]}


def open_model_and_store(model_or_run: nn.Module | str | os.PathLike, store_dir: str | os.PathLike | None = None,
                         log=None, before_write=None) -> tuple[nn.Module, Path, bool]:
    """(model, store directory, whether the store is temporary) for offloaded_generate.
    `before_write(model)` runs before a store is written (offloaded_generate checks the budget there)."""
    say = log or (lambda *_: None)
    check = before_write or (lambda _model: None)
    if isinstance(model_or_run, nn.Module):
        model = model_or_run
        if store_dir is not None and (Path(store_dir) / MANIFEST).is_file():
            with ExpertStore(store_dir) as st:
                if store_matches_model(st, model):
                    return model, Path(store_dir), False
            say(f"expert store {store_dir} does not match this model; rewriting it")
        check(model)
        temp = store_dir is None
        if not temp:
            check_store_target(store_dir)
        path = temporary_store_dir() / "store" if temp else Path(store_dir)
        try:
            write_store(model, path, source={"kind": type(model).__name__})
        except BaseException:
            if temp:
                shutil.rmtree(path.parent, ignore_errors=True)
            raise
        return model, path, temp
    path = Path(model_or_run)
    if (path / MANIFEST).is_file():
        return load_dense_lm(path), path, False
    if not (path / "checkpoints").is_dir():
        raise FileNotFoundError(f"{str(path)!r} is neither a moekit run directory (checkpoints/) nor an expert "
                                f"store ({MANIFEST})")
    store = Path(store_dir) if store_dir is not None else path / "expert-store"
    source = run_source(path)
    if (store / MANIFEST).is_file():
        with ExpertStore(store) as st:  # a damaged manifest is refused here, naming the file
            current = st.manifest.get("source") == source
        if current:
            return load_dense_lm(store), store, False
        say(f"expert store {store} was written from another checkpoint; rewriting it")
        check_store_target(store)
    from moekit.train import load_trained

    full, _, _ = load_trained(path)
    check(full)
    write_store(full, store, source=source)
    del full
    return load_dense_lm(store), store, False
