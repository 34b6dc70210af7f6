"""Merging LoRA into the base weights and back; merges of several LoRAs; mixtures built from LoRAs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import moekit
import moekit.adapters as ad
from moekit.errors import UsageError

from .conftest import logits, randomize_adapters, tiny_llama, tiny_moekit

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_then_unmerge_is_exact(dtype, ids):
    """Acceptance: merge -> unmerge restores every base weight bit for bit (bf16 included), and the merged
    model computes what the adapter computes."""
    model = tiny_llama().to(dtype)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ad.add_adapters(model, ad.LoRAConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    randomize_adapters(model, scale=0.2)
    with_adapter = logits(model, ids)
    ad.merge(model)
    assert all(layer.merged for _, layer in ad.adapter_layers(model))
    tol = 1e-5 if dtype == torch.float32 else 0.1
    assert torch.allclose(logits(model, ids).float(), with_adapter.float(), atol=tol, rtol=tol)
    changed = ad.adapter_layers(model)[0][1].base_layer.weight
    assert not torch.equal(changed, before["model.layers.0.self_attn.q_proj.weight"])
    ad.unmerge(model)
    ad.remove_adapters(model)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_merge_and_unload_gives_a_plain_model(ids):
    model = tiny_llama()
    ad.add_adapters(model, ad.LoRAConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    randomize_adapters(model, scale=0.2)
    expected = logits(model, ids)
    ad.merge_and_unload(model)
    assert not ad.adapter_layers(model)
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    assert torch.allclose(logits(model, ids), expected, atol=1e-5)


@pytest.mark.parametrize("cfg", [ad.MixLoRAConfig(target_modules=["q_proj"]), ad.LoRAMoEConfig(target_modules=["q_proj"]),
                                 ad.SMoRAConfig(r=8, router=moekit.RouterConfig(kind="topk", k=2), target_modules=["q_proj"]),
                                 ad.FlyLoRAConfig(r=8, k=2, target_modules=["q_proj"])])
def test_input_dependent_methods_refuse_to_merge(cfg):
    model = tiny_llama()
    weight = model.model.layers[0].self_attn.q_proj.weight.clone()
    ad.add_adapters(model, cfg)
    with pytest.raises(UsageError, match=f"{cfg.method} adapters cannot be merged"):
        ad.merge(model)
    assert torch.equal(ad.adapter_layers(model)[0][1].base_layer.weight, weight)


def test_merge_refuses_tied_weights():
    """moekit's LM ties lm_head to the embedding: merging into it would change the embedding too."""
    model = tiny_moekit()
    ad.add_adapters(model, ad.LoRAConfig(target_modules=["lm_head"]))
    with pytest.raises(UsageError, match="lm_head's weight is shared with embed.weight"):
        ad.merge(model)


def test_merge_loras_is_the_weighted_sum(ids):
    """merge_loras: one LoRA of rank N*r equal to sum_i w_i * (its update); uniform by default."""
    loras = []
    for seed in range(3):
        m = tiny_llama()
        ad.add_adapters(m, ad.LoRAConfig(r=2, lora_alpha=4, target_modules=TARGETS))
        randomize_adapters(m, seed=seed, scale=0.3)
        loras.append((ad.adapter_config(m), ad.adapter_state_dict(m)))
    cfg, state = ad.merge_loras(loras)
    assert (cfg.r, cfg.lora_alpha, cfg.scaling) == (6, 12, 2.0)
    merged = tiny_llama()
    ad.add_adapters(merged, cfg)
    ad.load_adapter_state(merged, state)
    deltas = []
    for c, s in loras:
        m = tiny_llama()
        ad.add_adapters(m, c)
        ad.load_adapter_state(m, s)
        deltas.append({n: layer.delta_weight() for n, layer in ad.adapter_layers(m)})
    for name, layer in ad.adapter_layers(merged):
        assert torch.allclose(layer.delta_weight(), sum(d[name] for d in deltas) / 3, atol=1e-6)
    with pytest.raises(UsageError, match="2 weights for 3 LoRAs"):
        ad.merge_loras(loras, [0.5, 0.5])


def test_load_mixture_puts_each_lora_in_its_expert(ids):
    """With the other expert disabled (logit -inf, so the pick has probability exactly 1), the mixture
    computes LoRA e."""
    loras, outputs = [], []
    for seed in range(2):
        m = tiny_llama()
        ad.add_adapters(m, ad.LoRAConfig(r=2, lora_alpha=4, target_modules=TARGETS))
        randomize_adapters(m, seed=seed, scale=0.3)
        loras.append((ad.adapter_config(m), ad.adapter_state_dict(m)))
        outputs.append(logits(m, ids))
    model = tiny_llama()
    s = ad.load_mixture(model, loras, ad.MixLoRAConfig(router=moekit.RouterConfig(kind="topk", k=1)))
    assert s.trainable == sum(layer.router.weight.numel() for _, layer in ad.adapter_layers(model))
    assert not torch.allclose(outputs[0], outputs[1], atol=1e-3)
    for e in range(2):
        for _, layer in ad.adapter_layers(model):
            layer.router.expert_mask_E = torch.tensor([0, -1] if e == 0 else [-1, 0], dtype=torch.int8)
        assert torch.allclose(logits(model, ids), outputs[e], atol=1e-5)
