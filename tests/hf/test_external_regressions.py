"""Wrapped-only failures found by transformers' own model tests (tests/external), reproduced on tiny configs
without the external files: each test here failed before its fix in moekit.hf."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, DeepseekV3Config, GptOssConfig, MixtralConfig, PreTrainedModel

import moekit
import moekit.hf
from moekit.hf import HFMoEBlock

_TINY = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=64, pad_token_id=0)


def _config(kind: str):
    if kind == "gpt_oss":
        return GptOssConfig(**_TINY, intermediate_size=48, num_local_experts=6, num_experts_per_tok=2,
                            layer_types=["full_attention", "sliding_attention"], sliding_window=16)
    # transformers' testers: gated GELU experts of width 37
    return MixtralConfig(**_TINY, intermediate_size=37, num_local_experts=6, num_experts_per_tok=2,
                         hidden_act={"mixtral-gelu": "gelu", "mixtral": "silu"}[kind])


@pytest.mark.parametrize("kind", ["mixtral", "mixtral-gelu", "gpt_oss"])
def test_a_model_built_under_the_meta_device_context_wraps(kind):
    # test_can_be_initialized_on_meta, from_pretrained and the loading tests build models inside
    # `with torch.device("meta")`: the activation probe must not inherit that device (it read values of meta tensors).
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(_config(kind))
        moekit.hf.wrap(model, verify=False)
    layers = [m for m in model.modules() if isinstance(m, HFMoEBlock)]
    assert len(layers) == 2
    assert all(p.is_meta for p in model.parameters())


def test_weights_not_initialised_yet_are_named_not_blamed_on_the_rule():
    # test_init_weights_can_init_buffers builds models with transformers' weight init skipped (torch.empty:
    # NaN); the probe then refused "its routing rule is not one moekit has". It names the weights instead.
    model = AutoModelForCausalLM.from_config(_config("mixtral"))
    with torch.no_grad():
        model.model.layers[1].mlp.gate.weight[0, 0] = float("nan")
    with pytest.raises(moekit.hf.UnsupportedBlockError, match=r"weights \['router'\] are not finite"):
        moekit.hf.wrap(model)
    assert moekit.hf.wrapped_blocks(model) == []  # all or nothing: the finite first block is not replaced either
    assert len(moekit.hf.wrapped_blocks(moekit.hf.wrap(model, verify=False))) == 2


def test_deepseek_v3_with_every_expert_per_token_wraps_exactly():
    # transformers' DeepSeek-V3 tester: k = 8 of 8 experts with topk_group=1 of n_group=2 (the top-k takes every
    # expert, the dropped group's by its -inf ties); moekit refused k > the kept groups' 4 experts.
    cfg = DeepseekV3Config(**{**_TINY, "num_key_value_heads": 4}, intermediate_size=32, moe_intermediate_size=16,
                           n_routed_experts=8, num_experts_per_tok=8, n_group=2, topk_group=1, n_shared_experts=1,
                           routed_scaling_factor=2.5, first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=16,
                           qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    ids = torch.randint(1, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids).logits
        moekit.hf.wrap(model)
        got = model(ids).logits
    assert len(moekit.hf.wrapped_blocks(model)) == 1
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_group_limited_k_between_the_kept_groups_and_all_experts_is_refused():
    # k = E is every expert; 4 < k < 8 would take dropped-group experts by the order of -inf ties.
    with pytest.raises(ValueError, match="k=6 is invalid with topk_group=1 groups of 4"):
        moekit.RouterConfig(kind="topk", k=6, score="sigmoid", n_group=2, topk_group=1).validate(8)
    assert moekit.RouterConfig(kind="topk", k=8, score="sigmoid", n_group=2, topk_group=1).validate(8).k == 8



def _wrap_at_construction(monkeypatch):
    """Wrap every transformers model at its post_init, as tests/external's hook does; returns that post_init."""
    original = PreTrainedModel.post_init

    def post_init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if not moekit.hf.wrapped_blocks(self):
            moekit.hf.wrap(self, verify=False)

    monkeypatch.setattr(PreTrainedModel, "post_init", post_init)
    return post_init


def test_gpt_oss_loads_into_a_model_wrapped_at_construction(tmp_path, monkeypatch):
    # from_pretrained builds the model (wrapped at its post_init, as the external hook does), then sets each
    # checkpoint tensor by its HF name: gpt-oss's `experts.gate_up_proj_bias` is the bank's `in_proj_bias`.
    torch.manual_seed(0)
    source = AutoModelForCausalLM.from_config(_config("gpt_oss")).eval()
    with torch.no_grad():
        for p in source.parameters():
            p.normal_(0, 0.2)
    source.save_pretrained(tmp_path)
    ids = torch.randint(1, 64, (1, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = source(ids).logits
    post_init = _wrap_at_construction(monkeypatch)
    model, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    monkeypatch.undo()
    assert len(moekit.hf.wrapped_blocks(model)) == 2
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    bank = moekit.hf.wrapped_blocks(model)[0].experts
    assert model.get_parameter("model.layers.0.mlp.experts.gate_up_proj_bias") is bank.in_proj_bias
    assert sorted(model.state_dict()) == sorted(source.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids).logits, want, rtol=1e-5, atol=1e-5)
    # No checkpoint at all (test_can_init_all_missing_weights): every tensor is materialised from meta by its HF
    # name (a plain tensor where the name is not in `_parameters`), then initialised.
    monkeypatch.setattr(PreTrainedModel, "post_init", post_init)
    fresh = type(source).from_pretrained(None, config=_config("gpt_oss"), state_dict={})
    monkeypatch.undo()
    bank = moekit.hf.wrapped_blocks(fresh)[1].experts
    assert isinstance(bank.in_proj_bias, torch.nn.Parameter) and not bank.in_proj_bias.is_meta
    assert not any(t.is_meta for t in fresh.state_dict().values())


def test_deepseek_v3_built_under_the_meta_device_keeps_its_selection_bias():
    # On the meta device moekit's placeholder buffers and the block's own e_score_correction_bias look alike:
    # only the placeholders become moekit's zeros (the block's was replaced, then refused as "no place").
    cfg = DeepseekV3Config(**{**_TINY, "num_key_value_heads": 4}, intermediate_size=32, moe_intermediate_size=16,
                           n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1,
                           q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
        hf_bias = model.model.layers[1].mlp.gate.e_score_correction_bias
        moekit.hf.wrap(model, verify=False)
    assert moekit.hf.wrapped_blocks(model)[0].router.e_score_correction_bias is hf_bias


def test_init_weights_leaves_no_moekit_buffer_uninitialised():
    # test_init_weights_can_init_buffers: built on meta, to_empty() (buffers hold whatever memory they get), then
    # init_weights(). moekit held a zero selection bias of its own in a softmax family's router, which init_weights
    # had to reset; the router now holds none (TopKRouter.drop_selection_bias), so the wrapped layers own no buffer
    # that transformers' init does not cover, and the model runs finite.
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(_config("gpt_oss"))
        moekit.hf.wrap(model, verify=False)
    model.to_empty(device="cpu")
    layers = moekit.hf.wrapped_blocks(model)
    hf_keys = set(model.state_dict())
    for layer in layers:
        assert layer.router.e_score_correction_bias is None
        for name, buf in layer.named_buffers():
            assert not buf.is_floating_point() or any(k.endswith(name) for k in hf_keys), name
    model.init_weights()
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    assert bool(logits.isfinite().all())
    assert all(bool(p.isfinite().all()) for p in model.parameters())


@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral"])
@pytest.mark.parametrize("reseed_every_step", [False, True])
def test_seeded_init_of_a_wrapped_model_draws_as_the_unwrapped_one(family, reseed_every_step, make_model,
                                                                  monkeypatch):
    # test_can_init_all_missing_weights: transformers' initialize_weights (children first, each module once) must
    # give a wrapped model the unwrapped one's weights, also where its tests reseed in every per-module step
    # (seeded_weight_init). The shared expert's Linears were drawn twice, and a block's experts continued its
    # router's draws instead of taking their own step.
    if reseed_every_step:
        step = PreTrainedModel._initialize_weights

        def seeded(*args, **kwargs):
            torch.manual_seed(42)
            step(*args, **kwargs)

        monkeypatch.setattr(PreTrainedModel, "_initialize_weights", seeded)

    def init(model):
        torch.manual_seed(42)
        originals = [m for b in moekit.hf.wrapped_blocks(model) for m in b.original().modules()]
        for m in [*model.modules(), *originals]:  # as freshly built (from_pretrained's missing weights)
            m.__dict__.pop("_is_hf_initialized", None)
        model.initialize_weights()
        return {k: v.clone() for k, v in model.state_dict().items()}

    model = make_model(family)
    want = init(model)
    moekit.hf.wrap(model)
    got = init(model)
    assert sorted(got) == sorted(want)
    assert not [k for k in want if not torch.equal(got[k], want[k])]
    moekit.hf.unwrap(model)
    assert "_initialize_weights" not in model.__dict__ and "_initialize_weights" not in model.model.__dict__


def test_finite_garbage_weights_are_named_by_the_probe():
    # torch.empty can hold huge finite values: the block's own output overflows to NaN on the probe; the probe
    # names the weights (not initialised yet?) rather than a rule difference.
    model = AutoModelForCausalLM.from_config(_config("mixtral"))
    with torch.no_grad():
        model.model.layers[0].mlp.experts.down_proj.fill_(3e38)
    with pytest.raises(moekit.hf.UnsupportedBlockError, match=r"own output on the probe is not finite or overflows"):
        moekit.hf.wrap(model)


def _deepseek_v3_config():
    return DeepseekV3Config(**{**_TINY, "num_key_value_heads": 4}, intermediate_size=32, moe_intermediate_size=16,
                            n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=1,
                            routed_scaling_factor=2.5, first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=16,
                            qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16)


@pytest.mark.parametrize("kind", ["deepseek_v3", "gpt_oss", "mixtral-gelu"])
def test_wrap_reads_the_same_under_another_default_dtype(kind):
    # transformers' test_keep_in_fp32_modules_strict_also_hardcode_fp32 builds models under an fp16 default dtype
    # (local_torch_dtype); moekit's probes drew their inputs in the default dtype and met the fp32 gate weight.
    cfg = _deepseek_v3_config() if kind == "deepseek_v3" else _config(kind)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    reference = moekit.hf.wrap(copy.deepcopy(model))
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)
    try:
        moekit.hf.wrap(model)
    finally:
        torch.set_default_dtype(default)
    assert [b.cfg for b in moekit.hf.wrapped_blocks(model)] == [b.cfg for b in moekit.hf.wrapped_blocks(reference)]
    ids = torch.randint(1, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=0)


def _qwen2_moe_config():
    from transformers import Qwen2MoeConfig
    return Qwen2MoeConfig(**_TINY, intermediate_size=37, moe_intermediate_size=12, shared_expert_intermediate_size=16,
                          num_experts=6, num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[])


_NAMING_CONFIGS = {"mixtral": lambda: _config("mixtral"), "qwen2_moe": _qwen2_moe_config,
                   "deepseek_v3": _deepseek_v3_config, "gpt_oss": lambda: _config("gpt_oss")}


@pytest.mark.parametrize("kind", sorted(_NAMING_CONFIGS))
def test_named_parameters_spell_the_state_dict_names(kind, tmp_path, monkeypatch):
    # test_model_weights_reload_no_missing_tied_weights: a checkpoint with no weight at all is loaded into a model
    # wrapped at construction; every missing key (a state_dict name: gate.weight, shared_expert.*,
    # experts.gate_up_proj_bias) must be a name of named_parameters() / named_buffers(), and every persistent one
    # of those a state_dict key. moekit's names (router.weight, shared_experts.*, experts.in_proj_bias) failed it.
    from safetensors.torch import save_file

    source = AutoModelForCausalLM.from_config(_NAMING_CONFIGS[kind]())
    source.save_pretrained(tmp_path)
    save_file({"tensor": torch.tensor([1, 2])}, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    _wrap_at_construction(monkeypatch)
    model, info = type(source).from_pretrained(tmp_path, output_loading_info=True)
    monkeypatch.undo()
    assert moekit.hf.wrapped_blocks(model)
    keys = set(model.state_dict())
    names = dict(model.named_parameters()) | dict(model.named_buffers())
    assert set(info["missing_keys"]) - set(names) == set()
    assert {n for n in names if n in keys} == keys
    assert {n for n, _ in model.named_parameters()} <= keys  # every parameter is state (none moekit-only)


@pytest.mark.parametrize("kind", sorted(_NAMING_CONFIGS))
def test_names_at_every_root_and_after_to_and_deepcopy(kind, names_match):
    model = moekit.hf.wrap(AutoModelForCausalLM.from_config(_NAMING_CONFIGS[kind]()), verify=False)
    names_match(model)
    names_match(copy.deepcopy(model))
    names_match(model.to(torch.float64))
    # a layer as the root: its own names, the HF block's
    layer = moekit.hf.wrapped_blocks(model)[0]
    assert {n for n, _ in layer.named_parameters()} == {n for n, _ in layer.original().named_parameters()}
    moekit.hf.unwrap(model)
    assert not moekit.hf.wrapped_blocks(model)
    assert {n for n, _ in model.named_parameters()} <= set(model.state_dict())
