"""Offloaded experts follow the bank's ExpertLayout and activation (issue 14 item 6): transposed stacks,
interleaved gate/up columns, per-expert biases, clamped SwiGLU, gated GELU, ReLU², weights on the expert
input, latent experts; stores a bank the format cannot hold are refused."""

from __future__ import annotations

import json

import pytest
import torch

from moekit.config import MoEConfig, RouterConfig
from moekit.experts import ExpertBank
from moekit.experts.bank import ExpertLayout
from moekit.models.lm import LMConfig, MoELM
from moekit.offload import ExpertStore, ExpertStoreError, offload, offloaded_generate, write_store
from moekit.offload.generate import decode_loop
from moekit.ops import grouped
from moekit.ops.ffn import Activation

GPT_OSS = (ExpertLayout(in_transposed=True, out_transposed=True, interleaved=True, bias=True),
           Activation("swiglu", limit=7.0, alpha=1.702, up_offset=1.0))
LLAMA4 = (ExpertLayout(in_transposed=True, out_transposed=True), Activation("swiglu"))
GEGLU = (ExpertLayout(), Activation("geglu"))
RELU2 = (ExpertLayout(), Activation("relu2"))


def lm(layout: ExpertLayout, act: Activation, seed: int = 0, **moe) -> MoELM:
    """A tiny MoELM whose banks store and compute their experts as `layout` and `act` say (random weights
    large enough that greedy decoding never hinges on rounding)."""
    torch.manual_seed(seed)
    cfg = LMConfig(vocab_size=256, d_model=32, n_layers=2, n_heads=4, max_seq_len=128, init_std=0.2,
                   moe=MoEConfig(d_model=32, d_expert=48, num_experts=8, activation=act.name,
                                 router=RouterConfig(kind="topk", k=2), **moe))
    model = MoELM(cfg).eval()
    for layer in model.moe_layers():
        bank = ExpertBank(8, layer.cfg.expert_dim, 48, act, layout)
        with torch.no_grad():
            for p in bank.parameters():
                p.normal_(0, 0.3 if p.dim() > 2 else 0.5)
        layer.experts = bank
    return model


@pytest.mark.parametrize("fmt", [GPT_OSS, LLAMA4, GEGLU, RELU2], ids=["gpt_oss", "llama4", "geglu", "relu2"])
@pytest.mark.parametrize("B, T", [(1, 3), (2, 60)])  # decode-sized and prefill-sized GEMMs
@pytest.mark.parametrize("numpy_blas", [False, True], ids=["mkl", "numpy_blas"])  # grouped.CPU_NUMPY_BLAS
def test_offloaded_forward_is_bitwise_the_resident_one(tmp_path, fmt, B, T, numpy_blas, monkeypatch):
    monkeypatch.setattr(grouped, "CPU_WX_MIN_WEIGHT_BYTES", 0)  # tiny experts: let decode-sized GEMMs run "loop_wx"
    monkeypatch.setattr(grouped, "numpy_blas_streams_faster", lambda: numpy_blas)  # and (I, O) ones "loop_numpy"
    model = lm(*fmt)
    ids = torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        refs = {}
        for path in ("loop", "kernel"):  # the resident forward through either grouped path
            with grouped.force(path) as ran:
                refs[path] = model(ids)
            assert ran["forward", path] > 0
        with grouped.record() as ran:  # and as it runs unforced: "loop_wx" where the layout and the rows allow
            resident = model(ids)
        store = write_store(model, tmp_path / "s")
        with offload(model, store, "25%", "lru") as rt, grouped.record() as ran_offloaded:
            assert rt.plan.capacity == 2  # a prefill needing all 8 experts runs in four cache steps
            out = model(ids)
    assert torch.equal(refs["loop"], refs["kernel"])
    assert torch.equal(out, resident)
    # the offloaded GEMMs ran the resident ones' paths (the kernel's numbers as one mm per expert: "loop"), and say so
    assert {p for (_, p) in ran_offloaded} == {"loop" if p == "kernel" else p for (_, p) in ran}, dict(ran_offloaded)
    # weights stored (O, I) run decode-sized GEMMs weight-first; gpt-oss's and Llama 4's (I, O) never do, but run
    # them in numpy's BLAS where the machine rule holds
    decode = B * T * 2 <= 4 * 8
    assert (ran["forward", "loop_wx"] > 0) == (decode and not fmt[0].in_transposed), dict(ran)
    assert (ran["forward", "loop_numpy"] > 0) == (decode and fmt[0].in_transposed and numpy_blas), dict(ran)
    if ran["forward", "loop_wx"] + ran["forward", "loop_numpy"] == 0:
        assert torch.equal(out, refs["loop"])
    else:
        torch.testing.assert_close(out, refs["loop"], atol=1e-5, rtol=1e-5)
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    plain = fmt[0] == ExpertLayout() and fmt[1].limit is None
    assert manifest["version"] == (1 if plain else 3)
    with ExpertStore(tmp_path / "s") as st:
        assert st.act == model.moe_layers()[0].experts.act and st.bank_layout == fmt[0]
        first = st.load(1, 5)
        bank = model.moe_layers()[1].experts
        stacked = bank.gate_up_proj if fmt[1].gated else bank.up_proj
        assert torch.equal(first[0], stacked[5]) and torch.equal(first[1], bank.down_proj[5])  # as the bank stores them
        if fmt[0].bias:
            assert torch.equal(first[2], bank.in_proj_bias[5]) and torch.equal(first[3], bank.down_proj_bias[5])


def test_weight_on_input_and_latent_experts_generate_as_resident():
    """Llama 4's score on the expert input and latent experts (LatentMoE, as nemotron_h) live in the layer,
    around the bank: the offloaded bank runs what the resident one does; the latent projections count as
    dense (resident) bytes and the store holds latent-width experts."""
    prompt = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(1))
    for model, policy in ((lm(*LLAMA4, weight_on_input=True), "lru"), (lm(*RELU2, latent_dim=16), "predictive")):
        ref, _, _ = decode_loop(model, prompt, 8, record=False)
        r = offloaded_generate(model, prompt, 8, "25%", policy)
        assert torch.equal(r.ids_BT, ref)
        assert r.metrics["simulated"]["hit_flags_equal_measured"]
        layer = model.moe_layers()[0]
        if layer.cfg.latent_dim is not None:
            assert r.metrics["expert_bytes"] == 2 * 48 * 16 * 4  # up (F, l) and down (l, F), fp32
            latent = sum(m.fc1_latent_proj.weight.numel() + m.fc2_latent_proj.weight.numel()
                         for m in model.moe_layers()) * 4
            non_expert = sum(p.numel() * 4 for n, p in model.named_parameters() if ".experts." not in n)
            assert r.metrics["dense_bytes"] == non_expert and non_expert > latent > 0


def test_latent_preset_run_offloads_from_its_store(tmp_path):
    """A moekit `latent` preset run: its store holds l-wide experts, the model is built without them."""
    from moekit.train import train
    from moekit.train.presets import preset
    from moekit.train.trainer import load_trained

    model_cfg, train_cfg = preset("latent")
    model_cfg.d_model, model_cfg.n_layers, model_cfg.n_heads = 32, 2, 2
    model_cfg.moe.d_model, model_cfg.moe.d_expert, model_cfg.moe.latent_dim, model_cfg.moe.num_experts = 32, 32, 16, 8
    train_cfg.steps, train_cfg.micro_batch, train_cfg.seq_len, train_cfg.eval_tokens = 2, 2, 16, 64
    train_cfg.threads = 1
    run = tmp_path / "run"
    train(model_cfg.validate(), train_cfg.validate(), run, progress=False, log=lambda *a, **k: None)
    model, _, _ = load_trained(run)
    prompt = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(3))
    ref, _, _ = decode_loop(model.eval(), prompt, 8, record=False)
    r = offloaded_generate(run, prompt, 8, "50%", "lru")
    assert torch.equal(r.ids_BT, ref)
    with ExpertStore(run / "expert-store") as st:
        assert (st.d_model, st.num_experts) == (16, 8)


def test_formats_the_store_cannot_hold_or_does_not_match_are_refused(tmp_path):
    dbrx = lm(ExpertLayout(split=True, flat=True), Activation("swiglu"))
    with pytest.raises(ValueError, match="stored as split, flat stacks .DBRX., which the expert store does not hold"):
        write_store(dbrx, tmp_path / "dbrx")
    assert not (tmp_path / "dbrx").exists()
    # a storage option the store format does not know is refused by name, never ignored
    import dataclasses

    Extra = dataclasses.make_dataclass("Extra", [("mystery", bool, True)], bases=(ExpertLayout,), frozen=True)
    odd = lm(*LLAMA4)
    for layer in odd.moe_layers():
        object.__setattr__(layer.experts, "layout", Extra(in_transposed=True, out_transposed=True))
    with pytest.raises(ValueError, match="stored with mystery"):
        write_store(odd, tmp_path / "odd")
    write_store(lm(*GPT_OSS), tmp_path / "oss")
    plain = lm(ExpertLayout(), Activation("swiglu"))
    with pytest.raises(ExpertStoreError, match="holds experts stored as .* with activation swiglu limit=7 alpha=1.702 up"):
        offload(plain, tmp_path / "oss", "50%")
    # a version-3 manifest without its layout is refused on open, naming the key
    man = tmp_path / "oss" / "manifest.json"
    m = json.loads(man.read_text())
    del m["layout"]
    man.write_text(json.dumps(m))
    with pytest.raises(ExpertStoreError, match="key 'layout' is missing"):
        ExpertStore(tmp_path / "oss")


def test_the_store_records_a_clamp_after_the_activation():
    """Step-3.7 clamps its gate after the SiLU: the manifest keeps that (`clamp_after`), so the runtime does
    not compute the gpt-oss order (clamp before) on offloaded experts."""
    from moekit.offload.store import _activation_params, store_activation

    act = Activation("swiglu", limit=0.7, clamp_after=True)
    m = {"activation": "swiglu", "activation_params": _activation_params(act), "layout": {}}
    assert store_activation(m) == act
    m["activation_params"].pop("clamp_after")  # a version-3 store written before the key existed
    assert not store_activation(m).clamp_after


def test_merged_experts_in_a_pretrained_layout_are_refused_and_layout_stores_stay_version_3(tmp_path):
    # version 4 (mixed widths, merged layers) holds moekit's standard layout only; version 3 is the bank's layout
    model = lm(*LLAMA4)
    assert json.loads((write_store(model, tmp_path / "v3") / "manifest.json").read_text())["version"] == 3
    for layer in model.moe_layers():
        layer.expert_map_E = torch.arange(8) % 4
    with pytest.raises(ValueError, match="version-4 stores hold moekit's standard layout only"):
        write_store(model, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    plain = lm(ExpertLayout(), Activation("swiglu"))
    for layer in plain.moe_layers():
        layer.expert_map_E = torch.arange(8) % 4
    assert json.loads((write_store(plain, tmp_path / "v4") / "manifest.json").read_text())["version"] == 4


def test_offloaded_decode_equals_resident_where_the_hidden_layer_reaches_the_per_expert_rule(tmp_path, monkeypatch):
    """A decode-sized fp32 forward (3 tokens: 6 rows over 8 experts) whose hidden activations reach
    grouped.CPU_PER_EXPERT_BYTES per expert (at the real sizes: 2F >= 32768 at 4 rows per expert; here both size
    rules are lowered to these tiny experts): the resident bank runs the grouped GEMMs ("loop_wx"), not one
    F.linear FFN per expert, so the offloaded forward, which mirrors the grouped GEMMs, equals it bit for bit."""
    monkeypatch.setattr(grouped, "CPU_WX_MIN_WEIGHT_BYTES", 0)
    monkeypatch.setattr(grouped, "CPU_PER_EXPERT_BYTES", 1)
    model = lm(ExpertLayout(), Activation("swiglu"))
    ids = torch.randint(0, 256, (1, 3), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        with grouped.record() as ran:
            ref = model(ids)
        with offload(model, write_store(model, tmp_path / "s"), "25%", "lru"):
            out = model(ids)
    assert torch.equal(out, ref)
    assert ran["forward", "loop_wx"] == 4 and ran["ffn", "per_expert"] == 0, dict(ran)
