"""Every adapter method over every tiny base: forward, zero update at init, backward reaching only the
adapters, save/load round trip."""

from __future__ import annotations

import copy

import pytest
import torch

import moekit.adapters as ad

from .conftest import BASES, METHODS, logits, method_configs, randomize_adapters

CASES = [(m, b) for m in METHODS for b in BASES]


@pytest.mark.parametrize("method,base", CASES)
def test_zero_B_equals_base(method, base, ids):
    """Acceptance: with B = 0 (the initialisation) every method leaves the base model's output unchanged."""
    model = BASES[base]()
    expected = logits(model, ids)
    ad.add_adapters(model, method_configs()[method])
    for _, layer in ad.adapter_layers(model):
        B = layer.lora_B.weight if isinstance(layer.lora_B, torch.nn.Linear) else layer.lora_B
        assert not B.any()
    assert torch.equal(logits(model, ids), expected)


@pytest.mark.parametrize("method,base", CASES)
def test_backward_reaches_only_adapters(method, base, ids):
    model = BASES[base]()
    ad.add_adapters(model, method_configs()[method])
    adapter_params = {id(p) for _, layer in ad.adapter_layers(model)
                      for name, p in layer.named_parameters() if not name.startswith("base_layer.")}
    randomize_adapters(model)
    model.train()
    out = logits(model, ids)
    assert out.shape == (*ids.shape, 64)
    ctx = ad.task_types(model, torch.tensor([0, 1])) if method == "loramoe" else torch.enable_grad()
    with ctx:
        out = logits(model, ids)
        aux = ad.aux_loss(model)
    if method in ("mixlora", "mixlora_topp", "smora", "loramoe"):
        assert aux.requires_grad and float(aux.detach()) > 0  # balance losses are on for these configs
    (out.float().pow(2).mean() + aux).backward()
    for name, p in model.named_parameters():
        if id(p) in adapter_params:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name
    assert ad.summary(model).trainable == sum(p.numel() for p in model.parameters() if p.requires_grad) > 0


@pytest.mark.parametrize("method,base", CASES)
def test_save_load_round_trip(method, base, ids, tmp_path):
    model = BASES[base]()
    fresh = copy.deepcopy(model)
    ad.add_adapters(model, method_configs()[method])
    randomize_adapters(model)
    expected = logits(model, ids)
    assert not torch.equal(expected, logits(fresh, ids))  # the adapters do change the output
    ad.save_adapters(model, tmp_path / "adapter")
    ad.load_adapters(fresh, tmp_path / "adapter")
    assert torch.equal(logits(fresh, ids), expected)
    assert ad.adapter_config(fresh).to_dict() == ad.adapter_config(model).to_dict()
