"""Routing rules of transformers families that moekit expresses as configuration: SparseMixer (Phi-3.5-MoE),
a group scored by its best two softmax scores (Mistral 4, Mistral Large 4), a scale the block applies after
combining (Beam, the privacy filter), a selection bias added to the logits (Kolibri-1), the clamp after the
activation (Step-3.7), hash routing on the token ids and sqrt-softplus scores (DeepSeek-V4), p-norm (DBRX)
and clamp-floored (ERNIE 4.5) renormalisation.

Each family: a tiny random model of the real classes (fp32), its rule read as stated, logits to 1e-5, 16
greedy tokens with the KV cache equal (a cached continuation for models without an LM head), `unwrap`
restoring the same modules, and `moekit.route(kind="topp")` running on it.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

import moekit
import moekit.hf
from moekit.errors import UsageError

VOCAB = 128
_BASE = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, intermediate_size=96, max_position_embeddings=256, pad_token_id=0, bos_token_id=1,
             eos_token_id=2)
_MLA = dict(q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16)
_MISTRAL4 = dict(_MLA, moe_intermediate_size=32, num_local_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
                 n_shared_experts=1, routed_scaling_factor=1.5, first_k_dense_replace=1)

# family -> (model type, config kwargs, the rule moekit must read, a model class name where AutoModelForCausalLM has
# none for the config)
FAMILIES = {
    "phimoe": ("phimoe", dict(num_local_experts=8, num_experts_per_tok=2), "k=2, sparsemixer eps=0.01", None),
    "mistral4": ("mistral4", _MISTRAL4,
                 "k=2, score=softmax, normalize=True, scale=1.5, groups=1/2, group_score=top2_sum", "Mistral4ForCausalLM"),
    "mistral_large4": ("mistral_large4_text", dict(_MISTRAL4, num_key_value_heads=4),
                       "k=2, score=softmax, normalize=True, scale=1.5, groups=1/2, group_score=top2_sum",
                       "MistralLarge4TextModel"),
    "openai_privacy_filter": ("openai_privacy_filter", dict(num_local_experts=8, num_experts_per_tok=2),
                              "k=2, score=softmax, normalize=True", "OpenAIPrivacyFilterModel"),
    "beam": ("beam", dict(moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
                          routed_scaling_factor=2.5, mlp_layer_types=["dense", "sparse", "sparse"]),
             "k=2, score=sigmoid, normalize=True, scale=2.5, groups=1/2", None),
    "kolibri1": ("kolibri1", dict(moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
                                  shared_expert_intermediate_size=32),
                 "k=2, score=sigmoid, normalize=True, selection bias on logits", None),
    "step3p7": ("step3p5", dict(moe_num_experts=8, moe_top_k=2, moe_intermediate_size=32, share_expert_dim=32,
                                mlp_layer_types=["dense", "sparse", "sparse"], swiglu_limits=[0, 0.5, 0.8],
                                sliding_window=64),
                "k=2, score=sigmoid, normalize=True", "Step3p7TextModel"),
    # Hash layers (token id -> experts table) first, then sqrt-softplus top-k; experts and shared expert clamped.
    "deepseek_v4": ("deepseek_v4", dict(num_local_experts=8, num_experts_per_tok=2, q_lora_rank=16, o_lora_rank=16,
                                        qk_rope_head_dim=8, index_topk=4, index_n_heads=2, index_head_dim=16,
                                        mlp_layer_types=["hash_moe", "moe", "moe"], swiglu_limit=1.0,
                                        routed_scaling_factor=1.5, sliding_window=64),
                    ("k=2, hash over 128 token ids, score=sqrtsoftplus, normalize=True, scale=1.5",
                     "k=2, score=sqrtsoftplus, normalize=True, scale=1.5"), None),
    "dbrx": ("dbrx", dict(d_model=64, n_heads=4, n_layers=2, max_seq_len=256,
                          attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0),
                          ffn_config=dict(ffn_hidden_size=48, moe_num_experts=8, moe_top_k=2,
                                          moe_normalize_expert_weights=2.0)),
             "k=2, score=softmax, normalize=True, normalize_p=2", None),
    "dbrx-unnormalised": ("dbrx", dict(d_model=64, n_heads=4, n_layers=2, max_seq_len=256,
                                       attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0),
                                       ffn_config=dict(ffn_hidden_size=48, moe_num_experts=8, moe_top_k=2,
                                                       moe_normalize_expert_weights=None)),
                          "k=2, score=softmax, normalize=False", None),
    "ernie4_5_moe": ("ernie4_5_moe", dict(moe_intermediate_size=32, moe_num_experts=8, moe_k=2, moe_norm_min=0.9,
                                          moe_layer_start_index=1),
                     "k=2, score=softmax, normalize=True, normalize_min=0.9", None),
}


def _build(randomized, family: str, **changes) -> nn.Module:
    model_type, kwargs, _, class_name = FAMILIES[family]
    cfg = AutoConfig.for_model(model_type, **{**_BASE, **kwargs, **changes})
    torch.manual_seed(0)
    if class_name is None:
        model = AutoModelForCausalLM.from_config(cfg)
    else:
        import importlib

        module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
        model = getattr(module, class_name)(cfg)
    # Well separated random weights (transformers' std 0.02 gives near-uniform routers), a non-zero selection
    # bias and a hash table of distinct experts, so that every part of the rule decides something.
    randomized(model)
    return model.eval()


def _out(model: nn.Module, ids: torch.Tensor, **kwargs):
    with torch.no_grad():
        out = model(ids, **kwargs)
    return out


def _main(out) -> torch.Tensor:
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def _continued(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The last 4 positions computed on top of the KV cache of the others."""
    first = _out(model, ids[:, :-4], use_cache=True)
    return _main(_out(model, ids[:, -4:], past_key_values=first.past_key_values, use_cache=True))


@pytest.fixture
def one_thread():
    """With two or more threads the CPU GEMMs block differently for transformers' per-expert loop and
    moekit's grouped GEMM: a block's outputs then differ by an ulp (1e-6 on outputs of 9 for DBRX), which
    these deliberately well-separated random 2-layer models amplify about 500x by the logits. One thread
    makes the two computations comparable at the issue's 1e-5."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_wraps_with_its_rule(family, randomized, one_thread, names_match):
    model = _build(randomized, family)
    ids = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))
    blocks = {n: m for n, m in model.named_modules() if moekit.hf.detect.looks_like_moe_block(m)}
    ref = _main(_out(model, ids))
    lm = hasattr(model, "generate") and getattr(model, "lm_head", None) is not None
    cached = family != "openai_privacy_filter"  # an encoder (token classification): no KV cache
    if lm:
        ref_tokens = model.generate(ids, max_new_tokens=16, do_sample=False, min_new_tokens=16)
    elif cached:
        ref_cont = _continued(model, ids)

    params = [n for n, _ in model.named_parameters()]
    moekit.hf.wrap(model)
    layers = moekit.hf.wrapped_blocks(model)
    assert len(layers) == len(blocks) > 0
    assert sorted(n for n, _ in model.named_parameters()) == sorted(params)  # the HF names, as state_dict's
    names_match(model)
    rule = FAMILIES[family][2]
    assert {layer.cfg.router.describe() for layer in layers} == ({rule} if isinstance(rule, str) else set(rule))
    torch.testing.assert_close(_main(_out(model, ids)), ref, atol=1e-5, rtol=1e-5)
    if lm:
        assert torch.equal(model.generate(ids, max_new_tokens=16, do_sample=False, min_new_tokens=16), ref_tokens)
    elif cached:
        torch.testing.assert_close(_continued(model, ids), ref_cont, atol=1e-5, rtol=1e-5)

    # Re-routing by top-p runs on the wrapped model (the tokens' expert counts vary) and is undone on exit.
    with moekit.route(model, kind="topp", p=0.5):
        routed = _main(_out(model, ids))
        per_token = layers[0].routing_info().experts_per_token_T
    assert per_token.min() >= 1 and len(set(per_token.tolist())) > 1
    assert not torch.allclose(routed, ref)
    torch.testing.assert_close(_main(_out(model, ids)), ref, atol=1e-5, rtol=1e-5)

    moekit.hf.unwrap(model)
    assert all(model.get_submodule(n) is m for n, m in blocks.items())
    assert torch.equal(_main(_out(model, ids)), ref)


def test_block_applied_scale_returns_the_routers_own_weights(randomized):
    """The privacy filter's router returns softmax / K and its block multiplies the output by K: moekit runs the
    softmax weights and hands back the block's second output (the router's weights) as the block does."""
    model = _build(randomized, "openai_privacy_filter")
    block = next(m for m in model.modules() if moekit.hf.detect.looks_like_moe_block(m))
    x = torch.randn(1, 6, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y, w = block(x)
    moekit.hf.wrap(model)
    layer = moekit.hf.wrapped_blocks(model)[0]
    assert layer.router_weight_scale == 2.0
    with torch.no_grad():
        y2, w2 = layer(x)
    torch.testing.assert_close(y2, y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w2, w.sort(dim=-1, descending=True).values, atol=1e-6, rtol=1e-5)


def test_selection_bias_on_logits_is_told_apart_on_a_random_model(randomized):
    """A random model's selection bias is zero, where adding it to the scores or to the logits picks the same
    experts: the router probe uses a non-zero one, so the reading holds once a checkpoint's bias is loaded."""
    model = _build(randomized, "kolibri1")
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.zero_()
    moekit.hf.wrap(model)
    assert all(layer.cfg.router.selection_bias_on == "logits" for layer in moekit.hf.wrapped_blocks(model))


def test_shared_expert_clamps_are_read_by_value(randomized):
    """Step-3.7 clamps its shared experts at limits of their own (swiglu_limits_shared), after the SiLU as its
    routed experts: read as MoEConfig.shared_activation_limit. A random model's small activations would hide a
    clamp, so the shared expert is probed on large inputs."""
    model = _build(randomized, "step3p7", swiglu_limits_shared=[0, 0.7, 0.9])
    ids = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))
    ref = _main(_out(model, ids))
    moekit.hf.wrap(model)
    assert [layer.cfg.shared_activation_limit for layer in moekit.hf.wrapped_blocks(model)] == [0.7, 0.9]
    torch.testing.assert_close(_main(_out(model, ids)), ref, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # the clamp decides something here
        for layer in moekit.hf.wrapped_blocks(model):
            layer.shared_experts.act = type(layer.shared_experts.act)("swiglu")
    assert not torch.allclose(_main(_out(model, ids)), ref, atol=1e-3)


def test_a_shared_expert_clamp_moekit_cannot_express_is_refused(randomized):
    """Routed experts without a clamp and a shared expert clamped after its SiLU: moekit's shared clamp takes the
    routed experts' settings (a clamp before the activation here, which differs at a limit as low as 0.7), so the
    block is refused, naming the clamp."""
    model = _build(randomized, "step3p7", swiglu_limits=None, swiglu_limits_shared=[0, 0.7, 0.7])
    with pytest.raises(moekit.hf.UnsupportedBlockError,
                       match=r"cannot wrap Step3p7SparseMoeBlock: its shared expert .* its own \(limit=0.7\)"):
        moekit.hf.wrap(model)


def test_a_scale_the_block_does_not_apply_is_refused(randomized):
    """The router's weights a constant times moekit's reading only stand for a block that rescales its output:
    a privacy-filter block made not to multiply by K (its router still divides by K) is refused by the block
    probe, not run with moekit's weights."""
    model = _build(randomized, "openai_privacy_filter")
    for m in model.modules():
        if moekit.hf.detect.looks_like_moe_block(m):
            m.num_experts = 1  # the block's "x K" (transformers names K num_experts there)
    with pytest.raises(moekit.hf.UnsupportedBlockError, match=r"cannot wrap OpenAIPrivacyFilterMLP: read as .*differs "
                                                              r"from the block's own"):
        moekit.hf.wrap(model)


def test_hash_block_refuses_token_ids_outside_its_table(randomized):
    """DeepSeek-V4's wrapped hash block takes the decoder layer's `input_ids` as its router state: an id outside
    the table's rows is refused by name (before the check: -1 read the table's last row, VOCAB an IndexError);
    in-range ids still give the HF block's output."""
    model = _build(randomized, "deepseek_v4")
    name = next(n for n, m in model.named_modules() if moekit.hf.detect.looks_like_moe_block(m)
                and any(b.endswith("tid2eid") for b, _ in m.named_buffers()))
    x = torch.randn(1, 4, 64, generator=torch.Generator().manual_seed(2))
    ids = torch.tensor([[0, 5, VOCAB - 1, 9]])
    with torch.no_grad():
        ref = model.get_submodule(name)(x, input_ids=ids)
    moekit.hf.wrap(model)
    layer = model.get_submodule(name)
    assert layer.cfg.router.kind == "hash"
    with torch.no_grad():
        torch.testing.assert_close(layer(x, input_ids=ids), ref, atol=1e-5, rtol=1e-5)
        for bad in (VOCAB, -1):
            with pytest.raises(UsageError, match=rf"^RouterConfig\(kind='hash'\): token id\(s\) {bad} out of "
                                                        rf"range; expected token ids in \[0, {VOCAB}\)"):
                layer(x, input_ids=torch.tensor([[0, 5, bad, 9]]))
