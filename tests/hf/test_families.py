"""Families moekit.hf has no code for: detection is structural and the rule comes from the router
and config, so other v5 MoE models with a rule moekit has work as they are; others are refused."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import moekit.hf

_BASE = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=96, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
_DEEPSEEK_ATTN = dict(q_lora_rank=32, kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
                      num_key_value_heads=4, head_dim=8)

# family -> (config kwargs, the rule moekit must read)
INFERRED = {
    "glm4_moe": (dict(moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
                      n_group=2, topk_group=1, routed_scaling_factor=1.5, first_k_dense_replace=1),
                 "k=2, score=sigmoid, normalize=True, scale=1.5, groups=1/2"),
    "dots1": (dict(moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
                   n_group=2, topk_group=1, first_k_dense_replace=1, norm_topk_prob=False),
              "k=2, score=sigmoid, normalize=False, groups=1/2"),
    "minimax": (dict(num_local_experts=8, num_experts_per_tok=2, head_dim=16),
                "k=2, score=softmax, normalize=True"),
    "deepseek_v2": (dict(_DEEPSEEK_ATTN, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2,
                         n_shared_experts=1, topk_method="greedy", n_group=4, topk_group=2, routed_scaling_factor=2.0),
                    "k=2, score=softmax, normalize=False, scale=2.0"),
    "deepseek_v2-grouped": (dict(_DEEPSEEK_ATTN, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2,
                                 n_shared_experts=1, topk_method="group_limited_greedy", n_group=4, topk_group=2),
                            "k=2, score=softmax, normalize=False, groups=2/4"),
    "exaone_moe": (dict(moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
                        routed_scaling_factor=2.5, first_k_dense_replace=1),
                   "k=2, score=sigmoid, normalize=True, scale=2.5, groups=1/2"),
}


def _model(family: str, kwargs: dict) -> torch.nn.Module:
    cfg = AutoConfig.for_model(family.split("-")[0], **{**_BASE, **kwargs})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g) if "norm" in name
                    else torch.randn(p.shape, generator=g) * (1.5 * p.shape[-1] ** -0.5 if p.dim() > 1 else 0.1))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.3 * torch.randn(b.shape, generator=g))
    return model


@pytest.mark.parametrize("family", list(INFERRED))
def test_other_families_are_inferred_and_match(family, names_match):
    kwargs, rule = INFERRED[family]
    model = _model(family, kwargs)
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
    params = [n for n, _ in model.named_parameters()]
    moekit.hf.wrap(model)
    layers = moekit.hf.wrapped_blocks(model)
    assert layers  # no per-family entry
    assert sorted(n for n, _ in model.named_parameters()) == sorted(params)  # the HF names, as state_dict's
    names_match(model)
    assert layers[0].cfg.router.describe() == rule
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("family", "kwargs", "why"), [
    # an MLP router with a state across layers (LongCat-Flash's identity experts wrap now: tests/hf/test_struct.py)
    ("zaya", dict(num_experts=8, num_experts_per_tok=1, head_dim=16), r"\(ZayaRouter\) carries a state across layers"),
])
def test_families_moekit_cannot_run_are_refused_by_class(family, kwargs, why):
    model = _model(family, kwargs)
    with pytest.raises(moekit.hf.UnsupportedBlockError, match=rf"cannot wrap \w+: .*{why}"):
        moekit.hf.wrap(model)
