"""What a wrapped model hands transformers in its routers' place has the dtype and shape the HF router gives it
(issue 14 item 4): the router logits `output_router_logits=True` records, and the router output some blocks
return beside the hidden states (Llama 4's logits, gpt-oss's chosen weights). moekit routes in fp32; the HF
routers return their weight's dtype (Mixtral, Qwen3-MoE, OLMoE, gpt-oss, Llama 4) or fp32 on purpose
(DeepSeek-V3's logits, the OpenAI privacy filter's weights). In bf16 / fp16 the values match within that
dtype's rounding; in fp32 they are moekit's fp32 logits exactly."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModel

import moekit.hf

_BASE = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2, head_dim=8)
# Families beyond conftest's: block-returned router outputs (gpt-oss's weights, Llama 4's logits), and a router
# returning fp32 weights from its own fp32 math in a bf16 model (the OpenAI privacy filter, a token classifier),
# a router taking the batch dims (AFMoE).
_MORE = {
    "gpt_oss": dict(intermediate_size=48, num_local_experts=6, num_experts_per_tok=2,
                    layer_types=["full_attention", "sliding_attention"], sliding_window=16),
    "llama4_text": dict(intermediate_size=48, intermediate_size_mlp=64, num_local_experts=6, num_experts_per_tok=1,
                        interleave_moe_layer_step=1, no_rope_layers=[1, 1], attention_chunk_size=64),
    "openai_privacy_filter": dict(intermediate_size=48, num_local_experts=6, num_experts_per_tok=2,
                                  sliding_window=16),
    # a router taking (B, T, D) and upcasting its logits itself (`.to(torch.float32)`)
    "afmoe": dict(intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3, num_dense_layers=1,
                  num_experts=6, num_experts_per_tok=2, num_shared_experts=1, sliding_window=16),
}
# family -> (the HF block class, whether the block returns a router output, the dtype its recorded logits have
# in a bf16 model: None for the model dtype)
FAMILIES = {
    "mixtral": ("MixtralSparseMoeBlock", False, None),
    "qwen3_moe": ("Qwen3MoeSparseMoeBlock", False, None),
    "olmoe": ("OlmoeSparseMoeBlock", False, None),
    "deepseek_v3": ("DeepseekV3MoE", False, torch.float32),
    "gpt_oss": ("GptOssMLP", True, None),
    "llama4_text": ("Llama4TextMoe", True, None),
    "openai_privacy_filter": ("OpenAIPrivacyFilterMLP", True, torch.float32),
    "afmoe": ("AfmoeSparseMoeBlock", False, torch.float32),
}
# bf16 / fp16 rounding of the logits (and of the hidden states the later layers' routers read)
_TOL = {torch.bfloat16: dict(atol=3e-2, rtol=3e-2), torch.float16: dict(atol=4e-3, rtol=4e-3)}


@pytest.fixture
def build(make_model, build_causal, randomized):
    def make(family: str) -> torch.nn.Module:
        if family not in _MORE:
            return make_model(family, router_aux_loss_coef=0.02) if family != "deepseek_v3" else make_model(family)
        if family == "openai_privacy_filter":  # no causal LM head: the base model
            torch.manual_seed(0)
            cfg = AutoConfig.for_model(family, **{**_BASE, **_MORE[family]})
            return randomized(AutoModel.from_config(cfg)).eval()
        return build_causal(family, **{**_BASE, **_MORE[family], "router_aux_loss_coef": 0.02})
    return make


def _run(model, ids, cls_name: str):
    """(model output with output_router_logits=True, the second item each MoE block returned, if any)."""
    returned = []
    blocks = [m for m in model.modules()
              if type(m).__name__ == cls_name or isinstance(m, moekit.hf.HFMoEBlock)]
    hooks = [b.register_forward_hook(lambda _m, _a, out: returned.append(out[1]) if isinstance(out, tuple) else None)
             for b in blocks]
    has_lm_head = hasattr(model, "lm_head")
    try:
        out = model(ids, labels=ids, output_router_logits=True) if has_lm_head else model(ids, output_router_logits=True)
    finally:
        for h in hooks:
            h.remove()
    return out, returned


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_router_outputs_have_the_hf_dtype_and_values(family, dtype, build, prompt):
    cls_name, returns, recorded_dtype = FAMILIES[family]
    model = build(family).to(dtype)
    ids = prompt(2, 8)
    with torch.no_grad():
        ref, ref_returned = _run(model, ids, cls_name)
        moekit.hf.wrap(model)
        out, returned = _run(model, ids, cls_name)
    want = recorded_dtype or dtype
    assert len(out.router_logits) == len(ref.router_logits) > 0
    for got, exp in zip(out.router_logits, ref.router_logits, strict=True):
        assert exp.dtype == want  # what the HF router gives (the table above), as moekit's hand-over
        assert got.dtype == exp.dtype and got.shape == exp.shape
        torch.testing.assert_close(got, exp, **_TOL[dtype])
    assert len(returned) == len(ref_returned) == (len(ref.router_logits) if returns else 0)
    for got, exp in zip(returned, ref_returned, strict=True):
        assert got.dtype == exp.dtype and got.shape == exp.shape
        torch.testing.assert_close(got, exp, **_TOL[dtype])
    if getattr(ref, "aux_loss", None) is not None:
        assert float(ref.aux_loss) > 0
        assert out.aux_loss.dtype == ref.aux_loss.dtype
        torch.testing.assert_close(out.aux_loss, ref.aux_loss, **_TOL[dtype])


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "gpt_oss"])
def test_the_dtype_rule_follows_a_cast_after_wrapping(family, build, prompt):
    """Wrapped in fp32, then cast to bf16: a router in its weight's dtype hands bf16, one in fp32 stays fp32."""
    cls_name, _, recorded_dtype = FAMILIES[family]
    model = build(family)
    ids = prompt(2, 8)
    moekit.hf.wrap(model)
    model.to(torch.bfloat16)
    with torch.no_grad():
        out, returned = _run(model, ids, cls_name)
    assert {t.dtype for t in out.router_logits} == {recorded_dtype or torch.bfloat16}
    assert all(t.dtype == torch.bfloat16 for t in returned)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_fp32_router_outputs_are_moekit_s_fp32_logits_exactly(family, build, prompt):
    """In fp32 the hand-over casts nothing: the recorded logits are the routers' own (T, E) fp32 logits, bit for
    bit, and match transformers' to 1e-5."""
    cls_name, returns, _ = FAMILIES[family]
    model = build(family)
    ids = prompt(2, 8)
    with torch.no_grad():
        ref, ref_returned = _run(model, ids, cls_name)
        moekit.hf.wrap(model)
        out, returned = _run(model, ids, cls_name)
    layers = moekit.hf.wrapped_blocks(model)
    assert len(out.router_logits) == len(layers)
    for got, exp, layer in zip(out.router_logits, ref.router_logits, layers, strict=True):
        assert got.dtype == torch.float32
        assert torch.equal(got, layer.routing_info().route.logits_TE)
        torch.testing.assert_close(got, exp, atol=1e-5, rtol=1e-5)
    for got, exp in zip(returned, ref_returned, strict=True):
        assert got.dtype == exp.dtype == torch.float32
        torch.testing.assert_close(got, exp, atol=1e-5, rtol=1e-5)
    if getattr(ref, "aux_loss", None) is not None:
        torch.testing.assert_close(out.aux_loss, ref.aux_loss, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("verify", [True, False], ids=["deferred-probe", "no-probe"])
@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_a_model_wrapped_on_the_meta_device_hands_over_the_hf_dtype(family, verify, build, prompt):
    """Big-model loading: wrapped before its weights exist (the rule read on meta tensors, or again by the
    deferred probe), loaded in bf16, it hands transformers what the loaded bf16 model does unwrapped."""
    cls_name = FAMILIES[family][0]
    real = build(family).to(torch.bfloat16)
    with torch.device("meta"):
        meta = type(real)(real.config).eval()
    moekit.hf.wrap(meta, verify=verify)
    meta.load_state_dict(real.state_dict(), assign=True)
    for name, buf in real.named_buffers():  # non-persistent buffers (rotary inv_freq): in no state_dict
        owner, _, leaf = name.rpartition(".")
        if getattr(meta.get_submodule(owner), leaf).is_meta:
            setattr(meta.get_submodule(owner), leaf, buf)
    ids = prompt(2, 8)
    with torch.no_grad():
        ref, ref_returned = _run(real, ids, cls_name)
        out, returned = _run(meta, ids, cls_name)
    assert [t.dtype for t in out.router_logits] == [t.dtype for t in ref.router_logits] == [torch.bfloat16] * 2
    assert [t.dtype for t in returned] == [t.dtype for t in ref_returned]
    for got, exp in zip(out.router_logits, ref.router_logits, strict=True):
        torch.testing.assert_close(got, exp, **_TOL[torch.bfloat16])
