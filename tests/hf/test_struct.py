"""Issue #14, expert and block structures: families whose blocks hold more than a router and a stacked
bank, wrapped as configurations of moekit's pieces (zero-computation experts, latent projections,
non-gated shared MLPs with biases, ...). Each family: logits to 1e-5, 16 greedy tokens with the KV
cache identical, the model's own tensors shared (same objects, same storage), every state_dict key
resolving on the wrapped model, and unwrap restoring the very same modules."""

from __future__ import annotations

import pytest
import torch

import moekit
import moekit.hf

_BASE = dict(vocab_size=128, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
             max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)

# family -> (config kwargs, the HF block class, what moekit must read from it)
FAMILIES = {
    # 2 identity experts past the 8 FFN experts (router columns 8, 9), gate_up_proj rows allocated for them
    "longcat_flash": (dict(num_layers=2, n_routed_experts=8, moe_topk=2, zero_expert_num=2, expert_ffn_hidden_size=16,
                           ffn_hidden_size=48, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8,
                           qk_nope_head_dim=8, v_head_dim=16, routed_scaling_factor=2.0),
                      "LongcatFlashMoE", dict(copy_experts=2, zero_experts=0, layout="spare=2")),
    # latent MoE: D=32 -> l=16 around non-gated ReLU^2 experts; a non-gated ReLU^2 shared MLP; biases (mlp_bias)
    "nemotron_h": (dict(layers_block_type=["attention", "moe", "moe"], n_routed_experts=8, num_experts_per_tok=2,
                        moe_intermediate_size=16, moe_shared_expert_intermediate_size=24, moe_latent_size=16,
                        mlp_bias=True, n_group=2, topk_group=1),
                   "NemotronHMoE", dict(latent_dim=16, activation="relu2", d_shared=24)),
    # latent width = model width: two real Linear(D, D) projections (not nn.Identity), in the block's order.
    # Before: each read as a router with D > E columns, refused as "two routers"
    "nemotron_h-square": (dict(layers_block_type=["attention", "moe", "moe"], n_routed_experts=8,
                               num_experts_per_tok=2, moe_intermediate_size=16, moe_shared_expert_intermediate_size=24,
                               moe_latent_size=32, mlp_bias=True, n_group=2, topk_group=1),
                          "NemotronHMoE", dict(latent_dim=32, activation="relu2", d_shared=24)),
    # no latent projections (nn.Identity children play no role), no biases
    "nemotron_h-plain": (dict(layers_block_type=["attention", "moe"], n_routed_experts=8, num_experts_per_tok=2,
                              moe_intermediate_size=16, moe_shared_expert_intermediate_size=24),
                         "NemotronHMoE", dict(latent_dim=None, activation="relu2")),
    # DeepSeek-V3's block with an RMSNorm on its output (MoEConfig.output_norm_eps)
    "axk1": (dict(num_hidden_layers=2, intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8,
                  num_experts_per_tok=2, n_shared_experts=1, n_group=2, topk_group=1, first_k_dense_replace=1,
                  q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16),
             "AXK1MoE", dict(output_norm_eps=1e-6)),
    # a fused gate_up_proj shared MLP with the experts' clamped SwiGLU; the block scales the routed output itself
    "minimax_m3_vl_text": (dict(num_hidden_layers=2, num_local_experts=8, num_experts_per_tok=2, intermediate_size=16,
                                shared_intermediate_size=24, dense_intermediate_size=48, routed_scaling_factor=2.0),
                           "MiniMaxM3VLSparseMoeBlock", dict(shared_activation_limit=7.0, d_shared=24)),
    # Inkling2's softcapped SwiGLU experts (Activation.softcap, read from mlp_gate_softcap / mlp_up_softcap)
    "inkling2_text": (dict(num_hidden_layers=2, num_local_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                           unpadded_vocab_size=128, mlp_gate_softcap=2.0, mlp_up_softcap=3.0),
                      "Inkling2SparseMoeBlock", dict(activation_softcap_gate=2.0, activation_softcap_up=3.0)),
    # SiLU-gated routed experts (fixed) and a shared MLP following hidden_act="gelu" (MoEConfig.shared_activation)
    "aria_text": (dict(num_hidden_layers=2, intermediate_size=16, moe_num_experts=8, moe_topk=2, moe_num_shared_experts=1,
                       hidden_act="gelu"), "AriaTextMoELayer", dict(activation="swiglu", shared_activation="geglu")),
    # the same with clamped routed experts (swiglu_limit) and a plain GELU-gated shared expert
    "hy_v4": (dict(num_hidden_layers=2, mlp_layer_types=["dense", "sparse"], n_routed_experts=8, num_experts_per_tok=2,
                   moe_intermediate_size=16, intermediate_size=48, n_shared_experts=1, n_group=2, topk_group=1,
                   q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
                   index_topk=4, index_n_heads=2, index_head_dim=16, hidden_act="gelu", swiglu_limit=0.5),
              "HYV4MoE", dict(activation_limit=0.5, shared_activation="geglu", shared_activation_limit=None)),
    # 2 stacked shared experts weighted per token by the router's 2 columns past the 8 experts (normalised with
    # the k chosen), a learned router scale (global_scale) and route_scale; GeGLU everywhere (hidden_act)
    "inkling_text": (dict(num_hidden_layers=2, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                          n_shared_experts=2, route_scale=2.0, unpadded_vocab_size=128, hidden_act="gelu"),
                     "InklingMoE", dict(num_shared_experts=2, d_shared=16, activation="geglu")),
    "jetmoe": (dict(num_hidden_layers=2, intermediate_size=16, num_local_experts=8, num_experts_per_tok=2,
                    kv_channels=8), "JetMoeMoE", dict(output_bias=True, activation="swiglu")),
}


@pytest.fixture
def build(build_causal):
    return lambda family: build_causal(family.split("-")[0], **{**_BASE, **FAMILIES[family][0]})


def _first(model, cls_name):
    return next(m for m in model.modules() if type(m).__name__ == cls_name)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_wraps_with_exact_parity(family, build, wrap_parity):
    _, cls_name, want = FAMILIES[family]
    model = build(family)
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    layer = wrap_parity(model, cls_name, ids)[0]
    for name, value in want.items():
        got = layer.experts.layout.describe() if name == "layout" else getattr(layer.cfg, name)
        assert got == value, (name, got)


def test_longcat_identity_experts_are_routed_and_share_the_rows(build):
    """The identity columns are picked on real input (else parity proves nothing about them), and the
    bank's input stack is the model's own (E + 2, 2F, D) Parameter, viewed (E, 2F, D)."""
    model = build("longcat_flash")
    block = _first(model, "LongcatFlashMoE")
    moekit.hf.wrap(model)
    layer = moekit.hf.wrapped_blocks(model)[0]
    assert layer.experts.gate_up_proj is block.experts.gate_up_proj
    assert layer.experts.w_in.shape[0] == 8 and layer.experts.w_in.data_ptr() == block.experts.gate_up_proj.data_ptr()
    assert layer.router.weight is block.router.classifier.weight
    with torch.no_grad():
        model(torch.randint(3, 128, (4, 32), generator=torch.Generator().manual_seed(2)))
    assert layer.routing_info().zero_compute["copy"] > 0


@pytest.mark.parametrize("family", ["nemotron_h", "nemotron_h-square"])
def test_nemotron_latent_and_shared_modules_are_the_models(build, family):
    model = build(family)
    block = _first(model, "NemotronHMoE")
    moekit.hf.wrap(model)
    layer = moekit.hf.wrapped_blocks(model)[0]
    assert layer.fc1_latent_proj is block.fc1_latent_proj and layer.fc2_latent_proj is block.fc2_latent_proj
    assert layer.shared_experts.up_proj is block.shared_experts.up_proj and layer.shared_experts.gate_proj is None
    assert layer.fc1_latent_proj.bias is not None  # mlp_bias: biases come with the modules


def _switch(randomized, **kw):
    from transformers import AutoModelForSeq2SeqLM, SwitchTransformersConfig

    cfg = SwitchTransformersConfig(vocab_size=128, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2,
                                   num_sparse_encoder_layers=1, num_sparse_decoder_layers=1, num_heads=4,
                                   num_experts=8, dense_act_fn="relu", pad_token_id=0, eos_token_id=1,
                                   decoder_start_token_id=0, **kw)
    torch.manual_seed(0)
    return randomized(AutoModelForSeq2SeqLM.from_config(cfg)).eval()


@pytest.mark.parametrize("capacity", [64, 2])
def test_switch_listed_experts_and_its_capacity_rule(randomized, capacity, keys_resolve):
    """Switch's experts are separate wi/wo modules, held in place (ExpertLayout(listed)); its router is
    top-1 with a fixed capacity per expert and sequence, first tokens first, in eval too: capacity 2 on
    12-token prompts drops tokens, and the wrapped model drops the same ones (logits equal)."""
    model = _switch(randomized, expert_capacity=capacity)
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    blocks = [m for m in model.modules() if type(m).__name__ == "SwitchTransformersSparseMLP"]
    with torch.no_grad():
        ref = model(input_ids=ids, decoder_input_ids=ids).logits
        ref_gen = model.generate(ids, max_new_tokens=16, do_sample=False, min_new_tokens=16)
        ref_aux = model(input_ids=ids, decoder_input_ids=ids, labels=ids, output_router_logits=True)
    moekit.hf.wrap(model)
    layers = moekit.hf.wrapped_blocks(model)
    assert len(layers) == len(blocks) == 2
    layer = layers[0]
    assert layer.cfg.expert_capacity == capacity and layer.cfg.router.describe() == "k=1, score=softmax, normalize=False"
    assert layer.experts.layout.describe() == "listed" and layer.experts.in_proj[3] is blocks[0].experts["expert_3"].wi
    keys_resolve(model, model.state_dict())
    with torch.no_grad():
        got = model(input_ids=ids, decoder_input_ids=ids).logits
        dropped = layers[0].routing_info().num_dropped
        gen = model.generate(ids, max_new_tokens=16, do_sample=False, min_new_tokens=16)
        aux = model(input_ids=ids, decoder_input_ids=ids, labels=ids, output_router_logits=True)
    assert (dropped > 0) == (capacity == 2)
    for name in ("loss", "encoder_z_loss", "encoder_aux_loss", "decoder_z_loss", "decoder_aux_loss"):
        torch.testing.assert_close(getattr(aux, name), getattr(ref_aux, name))  # (B, T, E) router logits
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(gen, ref_gen)
    moekit.hf.unwrap(model)
    assert [m for m in model.modules() if type(m).__name__ == "SwitchTransformersSparseMLP"] == blocks


def test_sequence_capacity_keeps_the_first_tokens_of_each_sequence():
    """MoEConfig.expert_capacity against a hand count: per (sequence, expert), the first C tokens."""
    cfg = moekit.MoEConfig(d_model=8, d_expert=8, num_experts=2, activation="relu", expert_capacity=2,
                           router=moekit.RouterConfig(kind="topk", k=1, normalize=False))
    layer = moekit.MoELayer(cfg).eval()
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0, 0] = 1.0  # expert 0 where x[0] > 0, else expert 1
    x = torch.randn(2, 6, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = layer(x)
    want_keep = torch.zeros(2, 6, dtype=torch.bool)
    for b in range(2):
        seen = [0, 0]
        for t in range(6):
            e = 0 if x[b, t, 0] > 0 else 1
            want_keep[b, t] = seen[e] < 2
            seen[e] += 1
    assert torch.equal(y.abs().sum(-1) > 0, want_keep)
    assert layer.routing_info().num_dropped == int((~want_keep).sum()) > 0


def _coverage_script():
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[2] / "scripts" / "hf_coverage.py"
    spec = importlib.util.spec_from_file_location("hf_coverage", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ernie_vl_text_and_vision_blocks_wrap_and_the_modality_split_matches():
    """ERNIE-4.5-VL: each modality's sparse block (text_moe, vision_moe) wraps and returns what the HF one
    does (flattened output and logits); the parent block scatters them by token type. Mixed text and
    vision tokens through the parent: equal outputs and router logits; the whole text model: the
    coverage check (logits, greedy tokens with the KV cache, unwrap)."""
    cov = _coverage_script()
    assert cov.check("ernie4_5_vl_moe", "native")[1:] == ("match", "")
    model = cov.build("ernie4_5_vl_moe", "native")
    parent = next(m for m in model.modules() if type(m).__name__ == "Ernie4_5_VLMoeMoeBlock")
    x = torch.randn(2, 7, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    types = torch.zeros(2, 7, dtype=torch.long)
    types[0, 2:5], types[1, 4:] = 1, 2
    with torch.no_grad():
        ref_y, ref_logits = parent(x, types)
    moekit.hf.wrap(model)
    assert isinstance(parent.text_moe, moekit.hf.HFMoEBlock) and isinstance(parent.vision_moe, moekit.hf.HFMoEBlock)
    with torch.no_grad():
        y, logits = parent(x, types)
    torch.testing.assert_close(y, ref_y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    assert parent.vision_moe.routing_info().num_tokens == int((types > 0).sum())


def test_jetmoe_ffn_moe_wraps_and_its_mixture_of_attention_is_left_alone(build, wrap_parity):
    """JetMoeMoE has no `experts` child: its experts are two parallel (E, ., .) weights found by role, with
    a (D,) bias on the block's output (MoEConfig.output_bias). JetMoeMoA (mixture of attention, inside
    the attention) is not an FFN MoE: wrap leaves it as transformers runs it."""
    model = build("jetmoe")
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    layer = wrap_parity(model, "JetMoeMoE", ids)[0]
    block = layer.original()
    assert layer.cfg.output_bias and layer.output_bias is block.bias
    assert layer.experts.gate_up_proj is block.input_linear.weight and layer.cfg.router.describe().startswith("k=2")
    assert model.get_parameter("model.layers.0.mlp.bias") is block.bias
    assert sum(type(m).__name__ == "JetMoeMoA" for m in model.modules()) == 2  # untouched
    # its router's grouped output (positions of the (T, K) choice sorted by expert, their gates) is read: a
    # softmax over the top-k logits, bit for bit
    assert layer.cfg.router.softmax_after_topk
    x_TD = torch.randn(64, layer.cfg.d_model, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        order_N, _, gates_N, _, _ = block.router(x_TD)
        idx_TK, w_TK = layer.router.dense_choice(x_TD)[:2]
    hf_idx_TK = block.router.layer(x_TD).topk(2, dim=-1).indices
    assert torch.equal(idx_TK, hf_idx_TK) and torch.equal(w_TK.flatten()[order_N], gates_N)


def test_router_columns_past_the_experts_that_are_no_identity_are_refused(build):
    """Columns past E are read from what the experts do with them: a column that is neither 0 nor the
    input (here LongCat's identity swapped for tanh) is refused, naming the column."""
    model = build("longcat_flash")
    for m in model.modules():
        if type(m).__name__ == "LongcatFlashExperts":
            m.identity_expert = torch.nn.Tanh()
    with pytest.raises(moekit.hf.UnsupportedBlockError, match=r"router column 8 .* neither a zero nor an identity"):
        moekit.hf.wrap(model)


def test_offload_runs_wrapped_identity_and_latent_experts_and_refuses_listed_ones(build, randomized, tmp_path):
    """moekit.offload on wrapped LongCat-Flash (copy experts, spare stack rows) and Nemotron-H (latent,
    ReLU^2): the offloaded model's logits equal the resident ones; Switch's separate expert modules and
    Inkling2's softcapped SwiGLU (the store records an activation name) are refused by name."""
    from moekit.offload import offload, write_store

    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    for family in ("longcat_flash", "nemotron_h"):
        model = build(family)
        moekit.hf.wrap(model)
        with torch.no_grad():
            ref = model(ids).logits
        write_store(model, tmp_path / family)
        runtime = offload(model, tmp_path / family, budget="50%")
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, ref, atol=1e-5, rtol=1e-5)
        runtime.close()
    switch = _switch(randomized)
    moekit.hf.wrap(switch)
    with pytest.raises(ValueError, match=r"separate modules \(ExpertLayout\(listed=True\)"):
        write_store(switch, tmp_path / "switch")
    inkling2 = build("inkling2_text")
    moekit.hf.wrap(inkling2)
    with pytest.raises(ValueError, match=r"softcapped SwiGLU"):
        write_store(inkling2, tmp_path / "inkling2")


@pytest.mark.parametrize(("family", "why"), [
    ("doge", "single neurons, rows of two embedding tables"),
    ("zaya", "`gate` (ZayaRouter) carries a state across layers"),
])
def test_structures_moekit_lacks_are_refused_naming_the_feature(family, why):
    """Each still-refused structure is refused with a message naming the block and what is missing
    (the coverage script's check: tiny model of the real classes)."""
    block, status, reason = _coverage_script().check(family, "native")
    assert status == "refused" and why in reason, (block, status, reason)


def test_stack_rewriters_refuse_storage_read_in_place(build):
    """prune and expert renumbering rewrite (E, ., .) stacks by row; on LongCat's input stack with spare
    rows (or any layout read in place) they refuse instead of permuting the wrong rows."""
    from moekit.compress.prune import apply_keep
    from moekit.dispatch.placement import permute_experts_

    model = build("longcat_flash")
    moekit.hf.wrap(model)
    layer = moekit.hf.wrapped_blocks(model)[0]
    before = layer.experts.gate_up_proj.clone()
    with pytest.raises(ValueError, match=r"permute_experts_: .*read in place \(spare=2\)"):
        permute_experts_(list(reversed(range(8))), layer.experts, layer.router)
    with pytest.raises(ValueError, match=r"prune: .*read in place"):
        apply_keep(layer, [0, 1, 2, 3])
    assert torch.equal(layer.experts.gate_up_proj, before) and layer.experts.num_experts == 8


def test_listed_and_spare_banks_match_the_reference_loop_forward_and_backward():
    """ExpertLayout(listed) and ExpertLayout(spare) banks against moekit's reference loop (ops.reference),
    outputs and gradients; the listed bank's per-expert modules receive the gradients."""
    from moekit.experts.bank import ExpertBank, ExpertLayout
    from moekit.ops.reference import ReferenceExperts

    torch.manual_seed(0)
    for layout, act in ((ExpertLayout(listed=True, bias=True), "relu"), (ExpertLayout(spare=2), "swiglu")):
        bank = ExpertBank(4, 8, 6, act, layout)
        if layout.listed:
            for m in (*bank.in_proj, *bank.out_proj):
                torch.nn.init.normal_(m.bias)
        else:
            torch.nn.init.normal_(bank.gate_up_proj[4:])  # spare rows never read: nonzero on purpose
        x_ND = torch.randn(10, 8, requires_grad=True)
        offsets_E = torch.tensor([3, 5, 7, 10], dtype=torch.int32)
        y = bank(x_ND, offsets_E)
        g_fast = torch.autograd.grad(y.square().sum(), [x_ND, *bank.parameters()])
        y_ref = ReferenceExperts(bank)(x_ND, offsets_E)
        g_ref = torch.autograd.grad(y_ref.square().sum(), [x_ND, *bank.parameters()])
        torch.testing.assert_close(y, y_ref)
        for a, b in zip(g_fast, g_ref, strict=True):
            torch.testing.assert_close(a, b)
        if not layout.listed:
            assert bank.gate_up_proj.shape[0] == 6 and not g_fast[1][4:].any()


def test_shared_expert_own_activation_decides_the_output(build):
    """Aria's shared expert runs GeGLU beside SwiGLU routed experts: with the routed experts' activation in
    its place the logits move (the reading is not vacuous on this model)."""
    model = build("aria_text")
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
    moekit.hf.wrap(model)
    layer = moekit.hf.wrapped_blocks(model)[0]
    assert layer.shared_experts.act.name == "geglu" and layer.experts.act.name == "swiglu"
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref, atol=1e-5, rtol=1e-5)
        for layer in moekit.hf.wrapped_blocks(model):
            layer.shared_experts.act = type(layer.shared_experts.act)("swiglu")
        assert not torch.allclose(model(ids).logits, ref, atol=1e-3)


class _CenteredRMSNorm(torch.nn.Module):
    """Transcribed from transformers' muse_spark `MuseSparkTextCenteredRMSNorm`: r(x) (1 + w)."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps, self.weight = eps, torch.nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        out = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return (out * (1.0 + self.weight).float()).type_as(x)


class _InputScaledRMSNorm(_CenteredRMSNorm):
    """Transcribed from transformers' muse_spark `MuseSparkTextInputScaledRMSNorm`: r(x (1 + w))."""

    def forward(self, x):
        out = (x.float() * (1.0 + self.weight).float()).type_as(x).float()
        return (out * torch.rsqrt(out.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("ref_cls", "form"), [(_CenteredRMSNorm, "one_plus"), (_InputScaledRMSNorm, "one_plus_input")])
def test_norm_forms_match_the_transcribed_norms(ref_cls, form, dtype):
    from moekit.ops.norm import FormRMSNorm

    g = torch.Generator().manual_seed(0)
    ref, ours = ref_cls(16, 1e-6), FormRMSNorm(16, 1e-6, form)
    with torch.no_grad():
        ref.weight.copy_(torch.randn(16, generator=g))
        ours.weight.copy_(ref.weight)
    x = (3 * torch.randn(5, 16, generator=g)).to(dtype)
    assert torch.equal(ours.to(dtype)(x), ref.to(dtype)(x))
    assert moekit.hf.detect._norm_form(ref, 16, ValueError) == form  # read by value from the module itself


# Muse Spark's text tower has no causal-LM class of its own: its MuseSparkTextModel, greedy on hidden states
# against the input embeddings through the KV cache (as scripts/hf_coverage.py does for such families).
# Latent experts (D=32 -> 16) with a (1 + w) RMSNorm of their latent input, an input-scaled RMSNorm of every
# expert's output before its weight, and a router output multiplier.
_MUSE = dict(num_hidden_layers=2, mlp_layer_types=["dense", "sparse"], num_local_experts=8, num_experts_per_tok=2,
             moe_intermediate_size=16, moe_hidden_size=16, intermediate_size=48, output_multiplier=0.25,
             routed_scaling_factor=1.5)


@pytest.fixture
def muse(randomized):
    def make():
        from transformers import AutoConfig
        from transformers.models.muse_spark.modeling_muse_spark import MuseSparkTextModel

        torch.manual_seed(0)
        return randomized(MuseSparkTextModel(AutoConfig.for_model("muse_spark_text", **{**_BASE, **_MUSE}))).eval()
    return make


def _hidden(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).last_hidden_state


def _greedy_hidden(model, ids, n=16):
    emb = model.get_input_embeddings().weight
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
        seq = ids
        for _ in range(n):
            nxt = (out.last_hidden_state[:, -1] @ emb.T).argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
            out = model(input_ids=nxt, cache=out.past_key_values, use_cache=True)
    return seq


def test_muse_spark_wraps_with_exact_parity(muse, keys_resolve):
    model = muse()
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    ref, ref_gen = _hidden(model, ids), _greedy_hidden(model, ids)
    before, keys = dict(model.named_modules()), list(model.state_dict())
    ptrs = {p.data_ptr() for p in model.parameters()}
    moekit.hf.wrap(model)
    layer = moekit.hf.wrapped_blocks(model)[0]
    want = dict(latent_dim=16, latent_norm_form="one_plus", expert_output_norm_form="one_plus_input",
                latent_norm_eps=model.config.rms_norm_eps, expert_output_norm_eps=model.config.post_norm_eps)
    assert {k: getattr(layer.cfg, k) for k in want} == want
    assert layer.cfg.router.logit_scale == 0.25 and layer.cfg.router.routed_scaling_factor == 1.5
    assert {p.data_ptr() for p in model.parameters()} == ptrs  # no copies
    assert list(model.state_dict()) == keys
    keys_resolve(model, keys)
    torch.testing.assert_close(_hidden(model, ids), ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(_greedy_hidden(model, ids), ref_gen)
    moekit.hf.unwrap(model)
    after = dict(model.named_modules())
    assert after.keys() == before.keys() and all(after[n] is before[n] for n in before)
    assert torch.equal(_hidden(model, ids), ref)


def test_muse_spark_features_each_decide_the_output(muse):
    """Each Muse Spark feature matters on this model: without it the wrapped output moves."""
    import dataclasses

    model = muse()
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    ref = _hidden(model, ids)
    moekit.hf.wrap(model)
    layers = moekit.hf.wrapped_blocks(model)
    torch.testing.assert_close(_hidden(model, ids), ref, atol=1e-5, rtol=1e-5)
    for layer in layers:
        layer.router.cfg = dataclasses.replace(layer.router.cfg, logit_scale=1.0)
    assert not torch.allclose(_hidden(model, ids), ref, atol=1e-3)
    for layer in layers:
        layer.router.cfg = dataclasses.replace(layer.router.cfg, logit_scale=0.25)
    for name in ("latent_norm", "expert_output_norm"):
        for layer in layers:
            norm, layer._modules[name] = layer._modules[name], None
        assert not torch.allclose(_hidden(model, ids), ref, atol=1e-3), name
        for layer in layers:
            layer._modules[name] = norm
    torch.testing.assert_close(_hidden(model, ids), ref, atol=1e-5, rtol=1e-5)


def test_offload_runs_wrapped_muse_spark(muse, tmp_path):
    """The per-expert output norm and the latent norm are the layer's, around whatever runs the experts:
    moekit.offload's runtime (half the experts resident) gives the resident output."""
    from moekit.offload import offload, write_store

    model = muse()
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    moekit.hf.wrap(model)
    ref = _hidden(model, ids)
    write_store(model, tmp_path / "muse")
    runtime = offload(model, tmp_path / "muse", budget="50%")
    torch.testing.assert_close(_hidden(model, ids), ref, atol=1e-5, rtol=1e-5)
    runtime.close()


def test_inkling_router_weighted_shared_experts(build):
    """Inkling's router scores E + S columns: the S shared experts' weights come from it per token
    (RouterConfig.shared_slots), its learned global_scale is bound, and each part decides the output."""
    import dataclasses

    model = build("inkling_text")
    block = _first(model, "InklingMoE")
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
    moekit.hf.wrap(model)
    layer = moekit.hf.wrapped_blocks(model)[0]
    r = layer.cfg.router
    assert (r.shared_slots, r.learned_scale, r.routed_scaling_factor) == (2, True, 2.0)
    assert layer.router.global_scale is block.gate.global_scale and layer.router.weight is block.gate.weight
    assert layer.shared_experts.gate_proj is block.shared_experts.gate_proj
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref, atol=1e-5, rtol=1e-5)
        assert layer.routing_info().route.scores_TE.shape[-1] == 8  # the experts' columns only
        with moekit.route(model, k=3):  # the same kind: shared slots and learned scale kept
            assert model(ids).logits.shape == ref.shape
        for change in (dict(kind="topp", p=0.5), dict(shared_slots=0)):  # would drop the shared weights: refused
            with pytest.raises(ValueError, match=r"also weights its 2 shared experts"):
                with moekit.route(model, **change):
                    pass
        torch.testing.assert_close(model(ids).logits, ref, atol=1e-5, rtol=1e-5)
        for lay in moekit.hf.wrapped_blocks(model):  # shared weights 1 instead of the router's
            lay._weighted_shared_out_orig = lay._weighted_shared_out
            lay._weighted_shared_out = lambda h, w, lay=lay: lay._weighted_shared_out_orig(h, torch.ones_like(w))
        assert not torch.allclose(model(ids).logits, ref, atol=1e-3)
        for lay in moekit.hf.wrapped_blocks(model):
            del lay._weighted_shared_out
            lay.router.cfg = dataclasses.replace(lay.router.cfg, learned_scale=False)
            lay.router.global_scale = None
        assert not torch.allclose(model(ids).logits, ref, atol=1e-3)


def _inkling_reference(x_TD, router_w, bias_E, global_scale, route_scale, k, experts, shared, act):
    """Transcribed from transformers' inkling `InklingTopkRouter`, `InklingExperts` and `InklingSharedExperts`
    (the block's forward), on plain tensors: experts (gate_up (E, 2F, D), down (E, D, F)), shared (gate, up
    (S, F, D), down (S, D, F))."""
    S = shared[0].shape[0]
    logits = torch.nn.functional.linear(x_TD.float(), router_w.float())
    routed = logits[..., :-S].sigmoid()
    idx = torch.topk(routed + bias_E, k, dim=-1, sorted=False)[1]
    topk_logits = torch.cat([logits[..., :-S].gather(-1, idx), logits[..., -S:]], dim=-1)
    log_p = torch.nn.functional.logsigmoid(topk_logits)
    w = torch.exp(log_p - torch.logsumexp(log_p, dim=-1, keepdim=True)) * route_scale * global_scale
    gammas, w = w[..., -S:], w[..., :k]
    out = torch.zeros_like(x_TD)
    for t in range(x_TD.shape[0]):
        for j in range(k):
            e = idx[t, j]
            g, u = torch.nn.functional.linear(x_TD[t], experts[0][e]).chunk(2, dim=-1)
            out[t] += torch.nn.functional.linear(act(g) * u, experts[1][e]) * w[t, j]
    g = torch.bmm(x_TD.expand(S, -1, -1), shared[0].transpose(1, 2))
    u = torch.bmm(x_TD.expand(S, -1, -1), shared[1].transpose(1, 2))
    down = torch.bmm(act(g) * u * gammas.t().unsqueeze(-1), shared[2].transpose(1, 2))
    return out + down.sum(0)


def test_router_weighted_shared_experts_match_the_transcribed_inkling_block():
    """A plain moekit MoELayer configured as Inkling's block (shared_slots, learned_scale, a bank of S shared
    experts) computes the transcribed block on its own weights, forward and backward (the shared bank's
    grouped GEMM and the router's weights against the transcription's loops and bmm)."""
    E, S, D, F, k = 6, 2, 16, 8, 2
    cfg = moekit.MoEConfig(d_model=D, d_expert=F, num_experts=E, num_shared_experts=S, d_shared=F,
                           router=moekit.RouterConfig(kind="topk", k=k, score="sigmoid", routed_scaling_factor=2.0,
                                                      shared_slots=S, learned_scale=True))
    torch.manual_seed(0)
    layer = moekit.MoELayer(cfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        layer.router.e_score_correction_bias.copy_(0.3 * torch.randn(E, generator=g))
        layer.router.global_scale.fill_(0.7)
        for p in layer.shared_experts.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    x = torch.randn(7, D, generator=g)
    want = _inkling_reference(x, layer.router.weight, layer.router.e_score_correction_bias,
                              layer.router.global_scale, 2.0, k, (layer.experts.gate_up_proj, layer.experts.down_proj),
                              (layer.shared_experts.gate_proj, layer.shared_experts.up_proj,
                               layer.shared_experts.down_proj), torch.nn.functional.silu)
    got = layer(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    r = torch.randn(got.shape, generator=g)
    params = [layer.router.weight, layer.router.global_scale, layer.shared_experts.gate_proj,
              layer.shared_experts.down_proj, layer.experts.gate_up_proj]
    for a, b in zip(torch.autograd.grad((got * r).sum(), params), torch.autograd.grad((want * r).sum(), params),
                    strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    w_TS = layer.routing_info().route.extras.shared_weight_TS
    assert w_TS.shape == (7, S) and bool((w_TS > 0).all())
    assert layer.router.weight.shape == (E + S, D) and cfg.num_params() == sum(p.numel() for p in layer.parameters())
