"""Issue #14 families as configurations of moekit's pieces: detection by role, expert layouts read in
place, activations by value, router features. Each family: logits to 1e-5, greedy tokens with the KV
cache identical, the model's own Parameters shared (same objects, same storage), unwrap restores."""

from __future__ import annotations

import pytest
import torch

import moekit
import moekit.hf
from moekit.ops import grouped

_BASE = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2, head_dim=8)

# family -> (config kwargs, the HF block class, what moekit must read: router rule, activation, layout)
FAMILIES = {
    # a. the router child by role: `router` (Granite, Jamba), `gate.wg` with a `shared_mlp` (HunYuan)
    "granitemoe": (dict(intermediate_size=48, num_local_experts=6, num_experts_per_tok=2),
                   "GraniteMoeMoE", "k=2, score=softmax, normalize=True, softmax after top-k", "swiglu", "standard"),
    "jamba": (dict(intermediate_size=48, num_experts=6, num_experts_per_tok=2, num_hidden_layers=2,
                   attn_layer_period=1, attn_layer_offset=0, expert_layer_period=2, expert_layer_offset=1),
              "JambaSparseMoeBlock", "k=2, score=softmax, normalize=False", "swiglu", "standard"),
    "hunyuan_v1_moe": (dict(intermediate_size=48, num_experts=6, moe_topk=2),
                       "HunYuanMoEV1Moe", "k=2, score=softmax, normalize=True", "swiglu", "standard"),
    # b.-d. gpt-oss: router bias; transposed interleaved stacks with biases; clamped SwiGLU; a tuple return
    "gpt_oss": (dict(intermediate_size=48, num_local_experts=6, num_experts_per_tok=2,
                     layer_types=["full_attention", "sliding_attention"], sliding_window=16),
                "GptOssMLP", "k=2, score=softmax, normalize=True, softmax after top-k",
                "swiglu limit=7 alpha=1.702 up+1 interleaved",
                "in_transposed, out_transposed, interleaved, bias"),
    # Llama 4: sigmoid of the top-k logits, not renormalised, the weight on the expert's input; transposed
    "llama4_text": (dict(intermediate_size=48, intermediate_size_mlp=64, num_local_experts=6, num_experts_per_tok=1,
                         interleave_moe_layer_step=1, no_rope_layers=[1, 1], attention_chunk_size=64),
                    "Llama4TextMoe", "k=1, score=sigmoid, normalize=False", "swiglu", "in_transposed, out_transposed"),
    # d. the selection bias held by the block and passed to the router (MiniMax-M2, LFM2-MoE)
    "minimax_m2": (dict(intermediate_size=48, num_local_experts=6, num_experts_per_tok=2),
                   "MiniMaxM2SparseMoeBlock", "k=2, score=sigmoid, normalize=True", "swiglu", "standard"),
    # c. transformers' own test activation: gated GELU
    "mixtral-gelu": (dict(intermediate_size=48, num_local_experts=6, num_experts_per_tok=2, hidden_act="gelu"),
                     "MixtralSparseMoeBlock", "k=2, score=softmax, normalize=True", "geglu", "standard"),
}


@pytest.fixture
def build(build_causal):
    return lambda family: build_causal(family.split("-")[0], **{**_BASE, **FAMILIES[family][0]})


def _blocks(model, cls_name):
    return [(n, m) for n, m in model.named_modules() if type(m).__name__ == cls_name]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_wraps_as_a_configuration_with_exact_parity(family, build, wrap_parity):
    _, cls_name, rule, act, layout = FAMILIES[family]
    model = build(family)
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    layer = wrap_parity(model, cls_name, ids)[0]  # parity, no copies, keys, unwrap (conftest)
    assert layer.cfg.router.describe() == rule
    assert layer.experts.act.describe() == act and layer.experts.layout.describe() == layout


def test_llama4_weight_on_input_is_read_from_the_block_not_assumed(build):
    """Llama 4's router output does not say where the weight goes; the block probe does (the other
    place gives other outputs for gated experts)."""
    model = build("llama4_text")
    moekit.hf.wrap(model)
    layer = moekit.hf.wrapped_blocks(model)[0]
    assert layer.cfg.weight_on_input and layer.returns == "logits_TE"
    mixtral = build("mixtral-gelu")
    moekit.hf.wrap(mixtral)
    assert not moekit.hf.wrapped_blocks(mixtral)[0].cfg.weight_on_input


def test_gpt_oss_router_bias_and_layout_are_the_models_tensors(build):
    model = build("gpt_oss")
    (_, block), = _blocks(model, "GptOssMLP")[:1]
    moekit.hf.wrap(model)
    layer = moekit.hf.wrapped_blocks(model)[0]
    assert layer.router.bias is block.router.bias and layer.router.weight is block.router.weight
    assert layer.experts.gate_up_proj is block.experts.gate_up_proj  # stored (E, D, 2F), read as a view
    assert layer.experts.in_proj_bias is block.experts.gate_up_proj_bias
    assert layer.experts.down_proj_bias is block.experts.down_proj_bias
    assert layer.returns == "weights_TK"
    # The bias matters: without it the routing (and the output) changes.
    ids = torch.randint(3, 128, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(ids).logits
        saved = layer.router.bias
        layer.router.bias = None
        assert not torch.allclose(model(ids).logits, ref, atol=1e-3)
        layer.router.bias = saved


def test_gpt_oss_chosen_weights_fast_path_matches_to_padded_forward_and_backward(build, monkeypatch):
    """The (T, K) weights gpt-oss's block returns: a fixed-k route is grouped by token without
    `RouterOutput.to_padded` (asserted not called) and equals to_padded's, sorted descending; the hidden
    states and their gradients are the reference's; a padding mask or a re-routed top-p layer (tokens with
    other numbers of experts) falls back to to_padded."""
    from moekit.routers.base import RouterOutput

    model = build("gpt_oss")
    moekit.hf.wrap(model)
    layer = moekit.hf.wrapped_blocks(model)[0]
    x = torch.randn(2, 5, layer.cfg.d_model, generator=torch.Generator().manual_seed(4), requires_grad=True)
    y_ref, w_ref = layer(x)
    route = layer.routing_info().route
    want = route.to_padded()[1].sort(dim=-1, descending=True).values
    torch.testing.assert_close(w_ref, want, atol=0, rtol=0)
    (g_ref,) = torch.autograd.grad(y_ref.square().sum(), x)

    def no_padding(self):
        raise AssertionError("the fast path called to_padded")

    with monkeypatch.context() as m:
        m.setattr(RouterOutput, "to_padded", no_padding)
        y, w_TK = layer(x)
        (g,) = torch.autograd.grad(y.square().sum(), x)
        with pytest.raises(AssertionError, match="called to_padded"):  # masked tokens: the general path
            layer(x, padding_mask=torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]))
        with moekit.route(model, kind="topp", p=0.5), pytest.raises(AssertionError, match="called to_padded"):
            layer(x)
    assert w_TK.shape == (10, 2) and not w_TK.requires_grad
    torch.testing.assert_close(w_TK, want, atol=0, rtol=0)
    torch.testing.assert_close(y, y_ref, atol=0, rtol=0)
    torch.testing.assert_close(g, g_ref, atol=0, rtol=0)
    with moekit.route(model, kind="topp", p=0.5):
        _, w_topp = layer(x)
        padded = layer.routing_info().route.to_padded()[1].sort(dim=-1, descending=True).values
    torch.testing.assert_close(w_topp, padded, atol=0, rtol=0)


@pytest.mark.parametrize("family", ["gpt_oss", "llama4_text"])
def test_in_by_out_experts_decode_in_numpy_blas_as_transformers_does(family, build, monkeypatch):
    """gpt-oss's and Llama 4's experts are stored (I, O): where grouped.CPU_NUMPY_BLAS's machine rule holds (set here;
    the tiny experts are under its size floor, lowered) decoding runs "loop_numpy", and the greedy tokens with the
    KV cache are transformers' own; the full-prompt logits through it are within 1e-5."""
    monkeypatch.setattr(grouped, "numpy_blas_streams_faster", lambda: True)
    monkeypatch.setattr(grouped, "CPU_WX_MIN_WEIGHT_BYTES", 0)
    model = build(family)
    ids = torch.randint(3, 128, (2, 6), generator=torch.Generator().manual_seed(3))
    new = 16
    with torch.no_grad():
        ref_logits = model(ids).logits
        ref = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
        moekit.hf.wrap(model)
        with grouped.record() as ran:
            out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
        with grouped.force("loop_numpy") as forced:
            logits = model(ids).logits
    assert len(set(ref[0, 6:].tolist())) > 3  # not a degenerate repeat of one token
    assert torch.equal(out, ref)
    blocks = len(moekit.hf.wrapped_blocks(model))
    assert ran["forward", "loop_numpy"] >= 2 * blocks * (new - 1), dict(ran)  # every decode step's two expert GEMMs
    assert forced == {("forward", "loop_numpy"): 2 * blocks}
    assert ref_logits.abs().max() > 1.0
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)


def test_selection_bias_held_by_the_block_is_shared(build):
    model = build("minimax_m2")
    (_, block), = _blocks(model, "MiniMaxM2SparseMoeBlock")[:1]
    moekit.hf.wrap(model)
    layer = moekit.hf.wrapped_blocks(model)[0]
    assert layer.router.e_score_correction_bias is block.e_score_correction_bias
    assert "mlp.e_score_correction_bias" in [k.partition("layers.0.")[2] for k in model.state_dict()]


class _Sorts(torch.overrides.TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.count += getattr(func, "__name__", "") in ("sort", "argsort")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(("family", "selection_bias"), [("gpt_oss", False), ("gpt_oss", True), ("llama4_text", False)])
def test_tuple_return_after_the_inference_path_reads_its_dense_choice(family, selection_bias, build, monkeypatch):
    """gpt-oss (chosen weights) and Llama 4 (router logits) blocks return a second tensor: after the inference
    path it comes from the dense choice without building a RoutingInfo (asserted), equal bit for bit to what
    the general path returns. gpt-oss's weights come out of its rule (softmax over the sorted top-k logits) in
    descending order, so they are not sorted again (one sort per call: the dispatch's); a selection bias orders the
    choice by the biased logits, and then they are."""
    from moekit.layers.moe import _DenseRoute, reference_path

    model = build(family)
    model.eval()
    moekit.hf.wrap(model)
    layer = moekit.hf.wrapped_blocks(model)[0]
    E = layer.cfg.num_experts
    if selection_bias:  # large enough to reorder the choice against the logits
        layer.router.e_score_correction_bias = torch.linspace(3.0, -3.0, E)[torch.randperm(E, generator=torch.Generator().manual_seed(1))]
    x = torch.randn(2, 5, layer.cfg.d_model, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        with reference_path():
            y_ref, second_ref = layer(x)
        with monkeypatch.context() as m, _Sorts() as sorts:
            m.setattr(_DenseRoute, "build", lambda self: pytest.fail("built a RoutingInfo"))
            y, second = layer(x)
        assert layer.last_dense_choice() is not None
    assert torch.equal(y, y_ref) and second.dtype == second_ref.dtype
    assert torch.equal(second, second_ref)
    if family == "gpt_oss":
        assert sorts.count == 1 + selection_bias
        assert torch.equal(second, second.sort(dim=-1, descending=True).values)


@pytest.mark.parametrize(("family", "router_child"), [("gpt_oss", "router"), ("mixtral-gelu", "gate")])
def test_softmax_after_topk_is_read_where_it_reproduces_the_router_bit_for_bit(family, router_child, build):
    """gpt-oss's (and Granite's, see FAMILIES) routers take a softmax over the top k of the logits, Mixtral's
    renormalises the top k of the softmax: equal to ~1e-7, and the reading that gives transformers' router weights
    bit for bit is taken."""
    model = build(family)
    moekit.hf.wrap(model)
    x_TD = torch.randn(64, 32, generator=torch.Generator().manual_seed(2))
    for layer in moekit.hf.wrapped_blocks(model):
        assert layer.cfg.router.softmax_after_topk == (family == "gpt_oss")
        with torch.no_grad():
            _, hf_w_TK, hf_idx_TK = getattr(layer.original(), router_child)(x_TD)
            idx_TK, w_TK = layer.router.dense_choice(x_TD)[:2]
        hf_order, order = hf_idx_TK.argsort(-1), idx_TK.argsort(-1)
        assert torch.equal(hf_idx_TK.gather(1, hf_order), idx_TK.gather(1, order))
        assert torch.equal(hf_w_TK.gather(1, hf_order), w_TK.gather(1, order))


@pytest.mark.parametrize(("family", "after"), [("gpt_oss", True), ("mixtral-gelu", False)])
def test_a_near_zero_router_init_wraps_with_the_routers_own_choice(family, after):
    """transformers' tests build models with initializer_range=1e-10: the router logits differ by ~1e-10 and every
    softmax probability is 1/E in fp32. gpt-oss picks on the logits, where picking on the probabilities ties
    (tests/external: GptOssModelTest::test_can_load_ignoring_mismatched_shapes was refused); Mixtral picks on the
    probabilities, where gpt-oss's rule would pick other experts: each keeps its own and the model wraps."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(family.split("-")[0], **_BASE, **FAMILIES[family][0], initializer_range=1e-10)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids).logits
        moekit.hf.wrap(model)
        assert all(layer.cfg.router.softmax_after_topk == after for layer in moekit.hf.wrapped_blocks(model))
        torch.testing.assert_close(model(ids).logits, expected, atol=1e-5, rtol=1e-5)


def _after_topk_differs_somewhere(layer, router_child, x_TD) -> bool:
    """Whether gpt-oss's rule on the layer's logits gives other weights than the HF router somewhere (in the last
    bit): the probe can tell the two rules apart. Asserts the layer's own rule gives the HF router's bit for bit."""
    from moekit.routers.topk import topk_choice

    with torch.no_grad():
        _, hf_w_TK, hf_idx_TK = getattr(layer.original(), router_child)(x_TD)
        idx_TK, w_TK, _ = topk_choice(layer.router.logits(x_TD), hf_idx_TK.shape[1], softmax_after_topk=True)
        own_idx_TK, own_w_TK = layer.router.dense_choice(x_TD)[:2]
    hf_order, order, own_order = hf_idx_TK.argsort(-1), idx_TK.argsort(-1), own_idx_TK.argsort(-1)
    assert torch.equal(own_idx_TK.gather(1, own_order), hf_idx_TK.gather(1, hf_order))
    assert torch.equal(own_w_TK.gather(1, own_order), hf_w_TK.gather(1, hf_order))
    return not torch.equal(hf_w_TK.gather(1, hf_order), w_TK.gather(1, order))


@pytest.mark.parametrize(("family", "kw", "router_child"), [
    ("mixtral", dict(intermediate_size=48, num_local_experts=6, num_experts_per_tok=2), "gate"),
    # k = 4: the renormalised top k sums its k weights in transformers' (sorted) order, bit for bit
    ("olmoe", dict(intermediate_size=48, num_experts=8, num_experts_per_tok=4, norm_topk_prob=True), "gate"),
])
def test_a_renormalising_family_keeps_its_rule_where_softmax_after_topk_differs_in_the_last_bit(
        family, kw, router_child, build_causal):
    model = build_causal(family, **{**_BASE, **kw})
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids).logits
    moekit.hf.wrap(model)
    x_TD = torch.randn(64, 32, generator=torch.Generator().manual_seed(2))
    for layer in moekit.hf.wrapped_blocks(model):
        assert not layer.cfg.router.softmax_after_topk
        assert _after_topk_differs_somewhere(layer, router_child, x_TD)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected, atol=1e-5, rtol=1e-5)
