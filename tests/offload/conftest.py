"""Tiny models for the offload tests: weights drawn with a std large enough that greedy decoding
never hinges on rounding (the canonical init gives near-uniform logits)."""

from __future__ import annotations

import dataclasses
import signal

import pytest
import torch

from moekit.config import MoEConfig, RouterConfig
from moekit.models.lm import LMConfig, MoELM


def tiny_lm(E: int = 8, k: int = 2, n_layers: int = 3, activation: str = "swiglu", seed: int = 0,
            dtype: torch.dtype = torch.float32, d_model: int = 32, d_expert: int = 48, **router) -> MoELM:
    torch.manual_seed(seed)
    cfg = LMConfig(vocab_size=256, d_model=d_model, n_layers=n_layers, n_heads=4, max_seq_len=128, init_std=0.2,
                   moe=MoEConfig(d_model=d_model, d_expert=d_expert, num_experts=E, activation=activation,
                                 router=_router(k=k, **router)))
    return MoELM(cfg).to(dtype).eval()


def _router(kind: str = "topk", **kw) -> RouterConfig:
    """RouterConfig of `kind` with those of `kw` it has (k=2 is given to every kind)."""
    fields = {f.name for f in dataclasses.fields(RouterConfig(kind=kind))}
    return RouterConfig(kind=kind, **{n: v for n, v in kw.items() if n in fields})


@pytest.fixture
def model() -> MoELM:
    return tiny_lm()


@pytest.fixture
def prompt() -> torch.Tensor:
    return torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(1))


@pytest.fixture
def watchdog():
    """Fail (instead of hanging) if the test runs longer than 60 s."""
    def timeout(*_):
        raise TimeoutError("test hung: watchdog fired after 60 s")

    old = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A two-step moekit run of the tiny preset (top-p routing), E = 4."""
    from moekit.train import train
    from moekit.train.presets import preset

    model_cfg, train_cfg = preset("tiny")
    model_cfg.d_model, model_cfg.n_layers, model_cfg.n_heads = 32, 2, 2
    model_cfg.moe.d_expert, model_cfg.moe.num_experts = 32, 4
    train_cfg.steps, train_cfg.micro_batch, train_cfg.seq_len, train_cfg.eval_tokens = 2, 2, 16, 64
    train_cfg.threads = 1
    run = tmp_path_factory.mktemp("offload-run") / "run"
    train(model_cfg.validate(), train_cfg.validate(), run, progress=False, log=lambda *a, **k: None)
    return run
