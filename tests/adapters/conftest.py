"""Tiny base models (fp32, CPU, random weights, nothing downloaded) and one small config per method."""

from __future__ import annotations

import pytest
import torch

import moekit
import moekit.adapters as ad

VOCAB = 64


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(cfg).eval()


def tiny_qwen2(seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return Qwen2ForCausalLM(cfg).eval()  # q/k/v projections with bias


def tiny_moekit(seed: int = 0):
    """A dense moekit LM (n_dense = n_layers: every FFN is the dense SwiGLU, no MoE layer runs)."""
    from moekit.models import LMConfig, MoELM

    torch.manual_seed(seed)
    moe = moekit.MoEConfig(d_model=32, d_expert=32, num_experts=2, router=moekit.RouterConfig(kind="topk", k=1))
    cfg = LMConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, max_seq_len=64, n_dense=2, d_ff_dense=48,
                   moe=moe)
    return MoELM(cfg).eval()


BASES = {"llama": tiny_llama, "qwen2": tiny_qwen2, "moekit": tiny_moekit}

ATTN = ["q_proj", "v_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]


def method_configs() -> dict[str, ad.AdapterConfig]:
    """One small config per registered method (targets present in all three bases)."""
    return {
        "lora": ad.LoRAConfig(r=4, lora_alpha=8, target_modules=ATTN + MLP),
        "mixlora": ad.MixLoRAConfig(r=4, lora_alpha=8, num_experts=4, target_modules=ATTN + ["down_proj"],
                                    router=moekit.RouterConfig(kind="topk", k=2)),
        "mixlora_topp": ad.MixLoRAConfig(r=4, lora_alpha=8, num_experts=4, target_modules=["q_proj", "up_proj"],
                                         router=moekit.RouterConfig(kind="topp", p=0.5)),
        "loramoe": ad.LoRAMoEConfig(r=4, lora_alpha=8, num_experts=4, target_modules=MLP, blc_alpha=0.1,
                                    blc_weight=0.1),
        "smora": ad.SMoRAConfig(r=8, lora_alpha=16, target_modules=ATTN, router=moekit.RouterConfig(kind="topk", k=3)),
        "flylora": ad.FlyLoRAConfig(r=8, k=2, lora_alpha=16, target_modules=ATTN + ["up_proj"]),
    }


METHODS = list(method_configs())


def logits(model, ids):
    return ad.logits_of(model, ids)


@torch.no_grad()
def randomize_adapters(model, seed: int = 1, scale: float = 0.5) -> None:
    """Give every adapter tensor (B included) a random value so that the update is not zero."""
    g = torch.Generator().manual_seed(seed)
    for _, layer in ad.adapter_layers(model):
        for name, p in layer.named_parameters():
            if not name.startswith("base_layer."):
                p.copy_(torch.randn(p.shape, generator=g) * scale)


@pytest.fixture
def ids():
    return torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(7))
