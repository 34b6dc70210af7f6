import pytest
import torch

import moekit

_LAYER_FIELDS = {"num_shared_experts", "balance_scope", "shared_gate", "capacity_factor", "eval_capacity_factor",
                 "backend", "activation", "num_experts", "d_expert", "d_shared", "d_model"}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def make_cfg():
    """Factory for the canonical tiny config (d_model 32, E 4, k 2); keyword args override
    MoEConfig fields or RouterConfig fields by name."""

    def make(**kw) -> moekit.MoEConfig:
        layer_kw = {k: kw.pop(k) for k in list(kw) if k in _LAYER_FIELDS}
        base = {"d_model": 32, "d_expert": 64, "num_experts": 4}
        return moekit.MoEConfig(**{**base, **layer_kw}, router=moekit.RouterConfig(**kw))

    return make
