"""Targets, configs, summaries, the saved format and its errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import moekit
import moekit.adapters as ad
from moekit.errors import DataError, NotOwnedError, UsageError

from .conftest import METHODS, method_configs, randomize_adapters, tiny_llama, tiny_moekit, tiny_qwen2


def test_unknown_target_is_refused_by_name():
    model = tiny_llama()
    with pytest.raises(UsageError, match=r"'qproj' matches no module of LlamaForCausalLM; its linear layers are named "
                                         r"down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj"):
        ad.add_adapters(model, ad.LoRAConfig(target_modules=["q_proj", "qproj"]))
    assert not ad.adapter_layers(model) and all(p.requires_grad for p in model.parameters())


def test_non_linear_target_is_refused_by_name():
    with pytest.raises(UsageError, match=r"model.layers.0.mlp is a LlamaMLP, not a torch.nn.Linear"):
        ad.add_adapters(tiny_llama(), ad.LoRAConfig(target_modules=["mlp"]))


def test_adding_twice_is_refused():
    model = tiny_llama()
    ad.add_adapters(model, ad.LoRAConfig())
    with pytest.raises(UsageError, match="already has adapters"):
        ad.add_adapters(model, ad.LoRAConfig())


def test_summary_counts_what_was_adapted():
    model = tiny_qwen2()
    total = sum(p.numel() for p in model.parameters())
    s = ad.add_adapters(model, ad.LoRAConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    # q: 32 -> 32, v: 32 -> 16 (2 kv heads), down: 48 -> 32; per layer 4*(32+32) + 4*(32+16) + 4*(48+32)
    per_layer = 4 * 64 + 4 * 48 + 4 * 80
    assert (s.trainable, s.total, s.num_blocks) == (2 * per_layer, total + 2 * per_layer, 2)
    assert str(s) == (f"lora(r=4, lora_alpha=8) on 6 modules (down_proj x2, q_proj x2, v_proj x2) in 2 layers; "
                      f"trainable {2 * per_layer:,} of {total + 2 * per_layer:,} parameters "
                      f"({100 * 2 * per_layer / (total + 2 * per_layer):.2f}%)")


@pytest.mark.parametrize("method", METHODS)
def test_config_round_trip(method):
    cfg = method_configs()[method]
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d["type"] == type(cfg).__name__ and d["version"] == 1 and d["method"] == cfg.method
    back = ad.AdapterConfig.from_dict(d)
    assert type(back) is type(cfg) and back.to_dict() == cfg.to_dict()
    with pytest.warns(UserWarning, match="ignoring unknown keys"):
        ad.AdapterConfig.from_dict({**d, "surprise": 1})


@pytest.mark.parametrize("cfg,message", [
    (ad.LoRAConfig(r=0), r"LoRAConfig.r=0 is invalid; allowed: an integer >= 1"),
    (ad.LoRAConfig(lora_dropout=1.0), r"lora_dropout=1.0 is invalid"),
    (ad.LoRAConfig(target_modules=[]), r"target_modules=\[\] is invalid"),
    (ad.MixLoRAConfig(num_experts=2, router=moekit.RouterConfig(kind="topk", k=3)), r"RouterConfig.k=3 is invalid"),
    (ad.MixLoRAConfig(router=moekit.RouterConfig(kind="recurrent")), r"router.kind='recurrent' is invalid here"),
    (ad.LoRAMoEConfig(num_experts=3, blc_weight=0.1), r"an even number when blc_weight > 0"),
    (ad.FlyLoRAConfig(r=4, k=5), r"FlyLoRAConfig.k=5 is invalid; allowed: an integer in \[1, r=4\]"),
])
def test_invalid_configs_name_the_field(cfg, message):
    with pytest.raises(UsageError, match=message):
        cfg.validate()


def test_unknown_method_and_newer_version():
    with pytest.raises(UsageError, match="adapter method 'dora' is unknown"):
        ad.AdapterConfig.from_dict({"method": "dora"})
    with pytest.raises(UsageError, match="version 9 is newer"):
        ad.AdapterConfig.from_dict({**ad.LoRAConfig().to_dict(), "version": 9})


def test_non_causal_router_needs_consent():
    cfg = ad.MixLoRAConfig(target_modules=["q_proj"], router=moekit.RouterConfig(kind="expert_choice"))
    with pytest.raises(UsageError, match="is not causal"):
        ad.add_adapters(tiny_llama(), cfg)


def test_saved_lora_uses_peft_layout(tmp_path):
    model = tiny_llama()
    ad.add_adapters(model, ad.LoRAConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    randomize_adapters(model)
    ad.save_adapters(model, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert {k: config[k] for k in ("peft_type", "r", "lora_alpha", "target_modules", "bias", "task_type")} == {
        "peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "bias": "none",
        "task_type": "CAUSAL_LM"}
    tensors = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    assert tensors[key].shape == (4, 32) and len(tensors) == 2 * 2 * 2
    assert torch.equal(tensors[key], model.model.layers[0].self_attn.q_proj.lora_A.weight)


def test_save_refuses_foreign_directory_and_load_reports_damage(tmp_path):
    model = tiny_llama()
    ad.add_adapters(model, ad.LoRAConfig())
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(NotOwnedError, match="refusing to overwrite"):
        ad.save_adapters(model, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    ad.save_adapters(model, tmp_path / "a")
    ad.save_adapters(model, tmp_path / "a")  # an earlier adapter directory is replaced
    (tmp_path / "a" / "adapter_model.safetensors").write_bytes(b"not safetensors")
    fresh = tiny_llama()
    with pytest.raises(DataError, match="adapter_model.safetensors is damaged"):
        ad.load_adapters(fresh, tmp_path / "a")
    assert not ad.adapter_layers(fresh)
    with pytest.raises(DataError, match="is not an adapter directory"):
        ad.load_adapters(fresh, tmp_path / "missing")


def test_load_into_another_architecture_is_refused(tmp_path):
    model = tiny_llama()
    ad.add_adapters(model, ad.LoRAConfig(target_modules=["q_proj"]))
    ad.save_adapters(model, tmp_path / "a")
    other = tiny_moekit()  # its q_proj modules have other names
    with pytest.raises(DataError, match="adapts other modules"):
        ad.load_adapters(other, tmp_path / "a")
    assert not ad.adapter_layers(other)


def test_disabled_runs_the_base(ids):
    model = tiny_llama()
    expected = ad.logits_of(model, ids)
    ad.add_adapters(model, method_configs()["mixlora"])
    randomize_adapters(model)
    with ad.disabled(model):
        assert torch.equal(ad.logits_of(model, ids), expected)
    assert not torch.equal(ad.logits_of(model, ids), expected)


def test_router_step_state_moves_once_per_step(ids):
    """A router's aux-loss-free selection bias moves in after_optimizer_step, from the step's counts."""
    model = tiny_llama()
    ad.add_adapters(model, ad.MixLoRAConfig(num_experts=4, target_modules=["q_proj"],
                                            router=moekit.RouterConfig(kind="topk", k=1, bias_update_rate=0.1)))
    model.train()
    ad.logits_of(model, ids)
    layer = ad.adapter_layers(model)[0][1]
    counts = layer.step_counts_E.clone()
    assert counts.sum() == ids.numel()
    ad.after_optimizer_step(model)
    expected = 0.1 * torch.sign(counts.float().mean() - counts.float())
    assert torch.allclose(layer.router.e_score_correction_bias, expected)
    assert layer.step_counts_E.sum() == 0
