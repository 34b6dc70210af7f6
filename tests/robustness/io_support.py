"""Shared helpers of tests/robustness/test_io_*.py: tiny runs, traces, stores, and a snapshot of a
directory tree (to assert that nothing was written, deleted or left half-written)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np

import moekit

SRC = str(Path(moekit.__file__).resolve().parents[1])  # the moekit under test, for child processes

TINY_FLAGS = ["--model.d_model", "32", "--model.n_layers", "2", "--model.n_heads", "2", "--moe.d_expert", "32",
              "--moe.num_experts", "4", "--train.steps", "2", "--train.micro_batch", "2", "--train.seq_len", "16",
              "--train.eval_tokens", "64", "--train.threads", "1", "--no-progress"]


def train_tiny(run: Path, router: str = "topk") -> Path:
    """A two-step run of the tiny preset (E = 4, 2 layers); topk so that it can also be exported."""
    from moekit.config import RouterConfig
    from moekit.train import train
    from moekit.train.presets import preset

    model_cfg, train_cfg = preset("tiny")
    model_cfg.d_model, model_cfg.n_layers, model_cfg.n_heads = 32, 2, 2
    model_cfg.moe.d_expert, model_cfg.moe.num_experts = 32, 4
    model_cfg.moe.router = RouterConfig(kind=router, k=2)
    train_cfg.steps, train_cfg.micro_batch, train_cfg.seq_len, train_cfg.eval_tokens = 2, 2, 16, 64
    train_cfg.threads = 1
    train(model_cfg.validate(), train_cfg.validate(), run, progress=False, log=lambda *a, **k: None)
    return run


def tiny_lm(seed: int = 0):
    """A small MoELM (E = 4, k = 2, 2 layers) for store tests."""
    import torch

    from moekit.config import MoEConfig, RouterConfig
    from moekit.models.lm import LMConfig, MoELM

    torch.manual_seed(seed)
    cfg = LMConfig(vocab_size=256, d_model=32, n_layers=2, n_heads=4, max_seq_len=64, init_std=0.2,
                   moe=MoEConfig(d_model=32, d_expert=32, num_experts=4, router=RouterConfig(kind="topk", k=2)))
    return MoELM(cfg).eval()


def random_trace(S: int = 3, T: int = 20, L: int = 2, E: int = 6, k: int = 2, seed: int = 0):
    from moekit.analysis import RoutingTrace

    rng = np.random.default_rng(seed)
    return RoutingTrace([np.argsort(rng.random((L, T, E)), axis=2)[:, :, :k] for _ in range(S)], E,
                        [f"d{i % 2}" for i in range(S)])


def rewrite_trace(path: Path, out: Path, header_fn=None, column_fn=None) -> Path:
    """Copy a trace zip, editing the header and/or columns (valid zip CRCs, column checksums kept
    in step when `column_fn` changes a column)."""
    with zipfile.ZipFile(path) as z:
        members = {name: z.read(name) for name in z.namelist()}
    header = json.loads(members["header.json"])
    if column_fn is not None:
        for name in list(members):
            if name.endswith(".npy"):
                a = column_fn(name[:-4], np.lib.format.read_array(io.BytesIO(members[name])))
                buf = io.BytesIO()
                np.lib.format.write_array(buf, a)
                members[name] = buf.getvalue()
                header["columns"][name[:-4]] |= {"dtype": a.dtype.str, "shape": list(a.shape),
                                                 "sha256": hashlib.sha256(a.tobytes()).hexdigest()}
    if header_fn is not None:
        header = header_fn(header)
    members["header.json"] = json.dumps(header).encode()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as w:
        for name, raw in members.items():
            w.writestr(name, raw)
    return out


def snapshot(root: Path) -> dict[str, str]:
    """Every file under `root` (hidden ones included) -> sha256 of its bytes; directories as 'dir'."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root)] = "dir"
        for f in filenames:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, root)] = hashlib.sha256(Path(p).read_bytes()).hexdigest()
    return out


def moekit_subprocess(args: list[str], **kw) -> subprocess.Popen:
    """`python -m moekit.cli ARGS` running the moekit this test process imported."""
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("MOEKIT_DEBUG", None)
    return subprocess.Popen([sys.executable, "-m", "moekit.cli", *args], env=env, text=True, **kw)


def dead_pid() -> int:
    """A process id that is not running (a finished child's)."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid
