import pytest
import torch

import moekit
from moekit.models import LMConfig, MoELM


@pytest.fixture
def tiny_lm():
    """A 2-layer MoELM (d_model 32, 8 experts of width 32, top-2 renormalised unless told otherwise)."""

    def make(n_layers=2, num_experts=8, **router) -> MoELM:
        router = {"kind": "topk", "k": 2, **router}
        moe = moekit.MoEConfig(d_model=32, d_expert=32, num_experts=num_experts, router=moekit.RouterConfig(**router))
        torch.manual_seed(0)
        return MoELM(LMConfig(vocab_size=64, d_model=32, n_layers=n_layers, n_heads=2, max_seq_len=64, moe=moe)).eval()

    return make


@pytest.fixture
def windows():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 64, (8, 32), generator=g)
