"""Gemma 4 and DiffusionGemma: the sparse MoE runs inside the decoder layer (its router and experts children,
called by the layer's own forward beside its dense MLP), and moekit.hf wraps those two children
(moekit/hf/inline.py) into a normal moekit MoE layer (issue 14 item 2). Tiny random configs of the real
classes; nothing downloaded."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.utils import logging

import moekit
import moekit.hf
from moekit.hf.inline import HFInlineMoE, InlineRouterCall

logging.set_verbosity_error()

VOCAB = 300  # the byte tokenizer of `moekit generate --hf` (256 bytes + bos 256, eos 257, pad 258)
_SIZES = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
              head_dim=16, intermediate_size=48, moe_intermediate_size=16, num_experts=8, top_k_experts=2,
              enable_moe_block=True, max_position_embeddings=256, pad_token_id=258, bos_token_id=256,
              eos_token_id=257, sliding_window=32, layer_types=["sliding_attention", "full_attention"] * 1
              + ["full_attention"])


def _config(family: str, **over):
    if family == "gemma4":  # with per-layer inputs: a Linear(D, 8) beside the router, as wide as E
        return AutoConfig.for_model("gemma4_text", **{**_SIZES, **over}, vocab_size_per_layer_input=VOCAB,
                                    hidden_size_per_layer_input=8)
    return AutoConfig.for_model("diffusion_gemma_text", **{**_SIZES, **over})


def _randomize(model: torch.nn.Module) -> torch.nn.Module:
    """Well separated logits, and peaked routers (a random Gemma 4 router is near uniform: its input is normed
    and scaled by D^-0.5), so that top-p picks a varying number of experts."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("scale"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p.shape[-1] if p.dim() > 1 else 1
                std = 1.5 * fan_in**-0.5 * (8.0 if name.endswith("router.proj.weight") else 1.0)
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def _model(family: str = "gemma4", **over) -> torch.nn.Module:
    from transformers.models.diffusion_gemma.modeling_diffusion_gemma import DiffusionGemmaEncoderTextModel

    torch.manual_seed(0)
    cfg = _config(family, **over)
    model = AutoModelForCausalLM.from_config(cfg) if family == "gemma4" else DiffusionGemmaEncoderTextModel(cfg)
    return _randomize(model).eval()


def _ids():
    return torch.randint(3, 256, (2, 10), generator=torch.Generator().manual_seed(1))


def _out(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


@pytest.mark.parametrize("family", ["gemma4", "diffusion_gemma"])
def test_wrapped_matches_and_unwrap_restores_the_original(family):
    model = _model(family)
    ids = _ids()
    ref = _out(model, ids)
    before = dict(model.named_modules())
    params_before = {id(p) for p in model.parameters()}
    moekit.hf.wrap(model)
    layers = moekit.hf.wrapped_blocks(model)
    assert len(layers) == 3 and all(isinstance(m, HFInlineMoE) for m in layers)
    decoder = model.model.layers[0] if family == "gemma4" else model.layers[0]
    assert isinstance(decoder.router, InlineRouterCall) and decoder.experts is layers[0]
    assert layers[0].hf_class == type(before[_layer_name(model)]).__name__
    # no copies: the wrapped model holds exactly the HF Parameters
    assert {id(p) for p in model.parameters()} == params_before
    r = layers[0].router
    hf_router = before[f"{_layer_name(model)}.router"]
    assert r.weight is hf_router.proj.weight and r.input_norm.scale is hf_router.scale
    assert r.expert_scale is hf_router.per_expert_scale
    assert layers[0].experts.gate_up_proj is before[f"{_layer_name(model)}.experts"].gate_up_proj
    torch.testing.assert_close(_out(model, ids), ref, atol=1e-5, rtol=1e-5)
    assert layers[0].routing_info().route.num_assignments == ids.numel() * 2
    moekit.hf.wrap(model)  # idempotent
    assert len(moekit.hf.wrapped_blocks(model)) == 3
    moekit.hf.unwrap(model)
    after = dict(model.named_modules())
    assert after.keys() == before.keys() and all(after[n] is before[n] for n in before)
    assert torch.equal(_out(model, ids), ref)


def _layer_name(model) -> str:
    return "model.layers.0" if hasattr(model, "lm_head") else "layers.0"


@pytest.mark.parametrize("family", ["gemma4", "diffusion_gemma"])
def test_bf16_router_probabilities_equal_transformers_bit_for_bit(family):
    """Gemma 4's router runs in the model dtype (its norm returns `type_as(hidden_states)`, then the scales and the
    proj in bf16; RouterConfig.gate_dtype "weight"): the wrapped router's fp32 probabilities are transformers'."""
    model = _model(family).to(torch.bfloat16)
    hf_routers = [m for m in model.modules() if type(m).__name__.endswith("TextRouter")]
    moekit.hf.wrap(model)
    layers = moekit.hf.wrapped_blocks(model)
    x_TD = torch.randn(64, _SIZES["hidden_size"], generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    for layer, hf_router in zip(layers, hf_routers, strict=True):
        assert layer.router.cfg.gate_dtype == "weight"
        with torch.no_grad():
            probs_TE, _, idx_TK = hf_router(x_TD)
            route = layer.router(x_TD)
        assert torch.equal(route.scores_TE, probs_TE)
        assert torch.equal(route.to_padded()[0].sort(-1).values, idx_TK.sort(-1).values)


@pytest.mark.slow  # ~7 s on the shared machine; scripts/hf_coverage.py checks the same
def test_greedy_generation_with_the_kv_cache_is_token_identical():
    model = _model()
    ids = _ids()
    kw = dict(max_new_tokens=16, min_new_tokens=16, do_sample=False, use_cache=True, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        ref = model.generate(ids, **kw)
        moekit.hf.wrap(model)
        got = model.generate(ids, **kw)
    assert torch.equal(got, ref)


def test_state_dict_keys_resolve_and_save_reload_has_no_missing_or_unexpected_keys(tmp_path):
    model = _model()
    ids = _ids()
    keys = list(model.state_dict())
    moekit.hf.wrap(model)
    assert sorted(model.state_dict()) == sorted(keys)  # transformers' names, each once
    for key, t in model.state_dict(keep_vars=True).items():
        got = model.get_parameter(key) if isinstance(t, torch.nn.Parameter) else model.get_buffer(key)
        assert got is t, key
    want = _out(model, ids)
    model.save_pretrained(tmp_path)
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    moekit.hf.wrap(loaded.eval())
    torch.testing.assert_close(_out(loaded, ids), want, atol=1e-5, rtol=1e-5)
    # a wrapped model takes a wrapped model's (HF-named) keys, into moekit's own tensors
    fresh = moekit.hf.wrap(_halved(_model()))
    fresh.load_state_dict(model.state_dict(), strict=True)
    torch.testing.assert_close(_out(fresh, ids), want, atol=1e-5, rtol=1e-5)
    other = moekit.hf.wrap(_halved(_model()))
    other.load_state_dict(model.state_dict(), strict=True, assign=True)
    assert moekit.hf.wrapped_blocks(other)[0].router.expert_scale is not moekit.hf.wrapped_blocks(model)[0].router.expert_scale
    torch.testing.assert_close(_out(other, ids), want, atol=1e-5, rtol=1e-5)


def _halved(model):
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
    return model


def test_transformers_loading_path_sets_moekit_s_tensors():
    """transformers loads by get_submodule(HF path) + setattr: the router's HF names reach moekit's router."""
    model = moekit.hf.wrap(_model())
    layer = moekit.hf.wrapped_blocks(model)[0]
    router = model.get_submodule("model.layers.0.router")
    new = torch.nn.Parameter(torch.ones_like(router.per_expert_scale) * 2)
    router.per_expert_scale = new
    assert layer.router.expert_scale is new
    new_gate = torch.nn.Parameter(torch.randn_like(router.proj.weight))
    router.proj.weight = new_gate
    assert layer.router.weight is new_gate
    moekit.hf.unwrap(model)
    hf = model.model.layers[0].router
    assert hf.per_expert_scale is new and hf.proj.weight is new_gate


def test_output_router_logits_equal():
    """transformers records Gemma 4's router probabilities (its first output) as `router_logits`."""
    model = _model()
    ids = _ids()
    ref = model(ids, output_router_logits=True).router_logits
    moekit.hf.wrap(model)
    got = model(ids, output_router_logits=True).router_logits
    assert len(ref) == len(got) == 3
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_topp_reroute_is_ragged_and_keeps_the_input_norm_and_per_expert_scale():
    model = _model()
    ids = _ids()
    # p -> 0: top-1 of the same probabilities, renormalised (kept from the top-k rule) times the per-expert
    # scale: transformers' own router with top_k_experts=1
    one = _model(top_k_experts=1)
    ref1 = _out(one, ids)
    moekit.hf.wrap(model)
    k2 = _out(model, ids)
    with moekit.route(model, kind="topp", p=1e-6):
        torch.testing.assert_close(_out(model, ids), ref1, atol=1e-5, rtol=1e-5)
        assert moekit.hf.wrapped_blocks(model)[0].router.input_norm is not None
    with moekit.route(model, kind="topp", p=0.6):
        _out(model, ids)
        per_token = torch.cat([m.routing_info().experts_per_token_T for m in moekit.hf.wrapped_blocks(model)])
    assert per_token.min() >= 1 and len(set(per_token.tolist())) > 1  # ragged: a varying number per token
    assert torch.equal(_out(model, ids), k2)  # the top-k rule is back


def test_expert_masks_apply():
    model = moekit.hf.wrap(_model())
    ids = _ids()
    with moekit.mask_experts(model, disabled={0: [0, 1]}, forced={1: [5]}):
        _out(model, ids)
        layers = moekit.hf.wrapped_blocks(model)
        counts, forced = layers[0].routing_info().counts_E, layers[1].routing_info().counts_E
    assert counts[:2].sum() == 0 and counts.sum() == ids.numel() * 2
    assert forced[5] == ids.numel()  # a forced expert takes one of every token's k slots


# `moekit generate --hf DIR --expert-budget 25%` and `moekit analyze --hf DIR` on Gemma 4:
# tests/offload/test_hf_families.py (slow).


def test_wrapped_forward_offloaded_is_bitwise_resident(tmp_path):
    from moekit.offload import offload, write_store

    model = moekit.hf.wrap(_model())
    ids = _ids()
    ref = _out(model, ids)
    with offload(model, write_store(model, tmp_path / "s"), "25%"):
        out = _out(model, ids)
    assert torch.equal(out, ref)


def test_pruned_gemma4_saves_as_a_transformers_checkpoint_and_exports(tmp_path):
    """moekit.compress on a wrapped Gemma 4: the router's per-expert scale loses the pruned experts' rows with
    the gate; transformers reads the result with no moekit, and `moekit export` writes it."""
    from moekit.compress import calibrate, new_record, prune
    from moekit.compress.hf import export_hf_dir, load_hf, save_hf

    model = moekit.hf.wrap(_model())
    ids = _ids()
    record = new_record("test")
    calib = calibrate(model, ids, forward=lambda x: model(input_ids=x), outputs=True)
    record["steps"].append(prune(model, calib, 0.25, "reap").to_dict())
    layers = moekit.hf.wrapped_blocks(model)
    assert [m.router.expert_scale.shape[0] for m in layers] == [6, 6, 6]
    expected = _out(model, ids)
    save_hf(model, record, tmp_path / "out")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out", local_files_only=True).eval()  # no moekit
    assert plain.config.num_experts == 6
    torch.testing.assert_close(_out(plain, ids), expected, rtol=0, atol=1e-5)
    loaded, _ = load_hf(tmp_path / "out")
    torch.testing.assert_close(_out(loaded, ids), expected, rtol=0, atol=0)
    assert export_hf_dir(tmp_path / "out", tmp_path / "exp").is_dir()


@pytest.mark.parametrize("how", ["assign", "to_empty"])
def test_a_model_built_on_the_meta_device_wraps_and_probes_once_the_weights_exist(how):
    """Big-model loading: wrap on the meta device, load the weights, and the first forward probes the reading."""
    real = _model()
    ids = _ids()
    ref = _out(real, ids)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(_config("gemma4")).eval()
    moekit.hf.wrap(meta)
    layers = moekit.hf.wrapped_blocks(meta)
    assert len(layers) == 3 and all(m.__dict__.get("_deferred") for m in layers)
    if how == "assign":
        meta.load_state_dict(real.state_dict(), assign=True)
    else:
        meta.to_empty(device="cpu")
        meta.load_state_dict(real.state_dict())
    for name, buf in real.named_buffers():  # non-persistent buffers (rotary, embedding scales): recomputed on load
        owner, _, leaf = name.rpartition(".")
        setattr(meta.get_submodule(owner), leaf, buf.clone())
    torch.testing.assert_close(_out(meta, ids), ref, atol=1e-5, rtol=1e-5)
    assert not any(m.__dict__.get("_deferred") for m in layers) and layers[0].cfg.router.k == 2
    moekit.hf.unwrap(meta)
    assert torch.equal(_out(meta, ids), _out(real, ids))


@pytest.mark.slow  # ~16 s on the shared machine (builds a vision tower too)
def test_diffusion_gemma_block_diffusion_model_wraps_encoder_and_decoder_layers():
    """The whole DiffusionGemma (text encoder layers, diffusion decoder layers reading the encoder's KV cache,
    a tiny vision tower): every MoE layer of both stacks wraps; the logits differ from transformers' no more
    than twice what transformers' own two experts implementations differ from each other (fp32 summation order over
    6 MoE layers: ~1-2e-5 here), and unwrap restores them exactly."""
    from transformers.models.diffusion_gemma.configuration_diffusion_gemma import DiffusionGemmaConfig
    from transformers.models.diffusion_gemma.modeling_diffusion_gemma import DiffusionGemmaForBlockDiffusion

    vision = AutoConfig.for_model("gemma4_vision", hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    cfg = DiffusionGemmaConfig(text_config=_config("diffusion_gemma"), vision_config=vision, canvas_length=8)
    torch.manual_seed(0)
    model = _randomize(DiffusionGemmaForBlockDiffusion(cfg)).eval()
    ids, canvas = _ids(), torch.randint(3, 256, (2, 8), generator=torch.Generator().manual_seed(2))

    def logits():
        with torch.no_grad():
            return model(input_ids=ids, decoder_input_ids=canvas).logits

    ref = logits()
    model.set_experts_implementation("eager")
    eager = logits()
    moekit.hf.wrap(model)
    assert sorted({m.hf_class for m in moekit.hf.wrapped_blocks(model)}) == [
        "DiffusionGemmaDecoderTextLayer", "DiffusionGemmaEncoderTextLayer"]
    assert len(moekit.hf.wrapped_blocks(model)) == 6
    got = logits()
    # Each fp32 summation order is some eps off the exact logits; two orders differ by up to ~2 eps (`spread`), and
    # moekit's is a third: within 2 x spread of either (it read 1.35e-5 against a spread of 1.31e-5 with two BLAS
    # threads on an AVX-512 EPYC, 0.9e-5 with one); a wrong rule is off by orders of magnitude more.
    spread = max(1e-5, float((eager - ref).abs().max()))
    assert float((got - ref).abs().max()) <= 2 * spread and float((got - eager).abs().max()) <= 2 * spread
    moekit.hf.unwrap(model)
    assert torch.equal(logits(), eager)


def test_init_weights_reinitialises_the_wrapped_router_and_experts_and_switches_are_refused():
    from moekit.errors import UsageError

    model = moekit.hf.wrap(_model())
    layer = moekit.hf.wrapped_blocks(model)[0]
    r = layer.router
    with torch.no_grad():
        for t in (r.weight, r.input_norm.scale, r.expert_scale, layer.experts.gate_up_proj):
            t.zero_()
    model.apply(model._init_weights)  # transformers' per-module init: Gemma4TextRouter's scales to 1
    assert torch.equal(r.input_norm.scale, torch.ones_like(r.input_norm.scale))
    assert torch.equal(r.expert_scale, torch.ones_like(r.expert_scale))
    std = model.config.initializer_range
    assert 0.5 * std < float(layer.experts.gate_up_proj.detach().std()) < 2 * std and bool(r.weight.detach().any())
    with pytest.raises(UsageError, match="wrapped by moekit"):
        model.set_experts_implementation("eager")


def test_named_parameters_spell_the_decoder_layer_s_names(names_match):
    # the inline layer's HF names sit under the decoder layer (`layers.i.router.proj.weight`), not under its
    # experts child; a decoder layer as the root names them `router.proj.weight` (its state_dict's keys)
    model = moekit.hf.wrap(_model())
    names_match(model)
    layer = model.get_submodule(_layer_name(model))
    assert "router.proj.weight" in dict(layer.named_parameters())
