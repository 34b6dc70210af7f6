"""Layer architectures (issue 17): Chain-of-Experts, zero-computation experts, latent experts (and MoLAE
conversion), pre-gated routing: each against its definition, and each saves, loads, traces, offloads
and re-routes."""

import dataclasses

import numpy as np
import pytest
import torch

import moekit
from moekit.analysis.metrics import intra_layer_reuse
from moekit.analysis.routing_trace import RoutingTrace
from moekit.analysis.trace import TokenBatch, record_trace
from moekit.analysis.tracefile import load_trace, save_trace
from moekit.config import MoEConfig, RouterConfig
from moekit.errors import UsageError
from moekit.layers.latent import molae_layer, molae_model
from moekit.layers.moe import LayerCarry, MoELayer
from moekit.models.generate import generate
from moekit.models.lm import LMConfig, MoELM
from moekit.offload.generate import decode_loop, offloaded_generate
from moekit.offload.runtime import offload
from moekit.offload.store import write_store
from moekit.ops.ffn import expert_ffn
from moekit.ops.reference import moe_reference
from moekit.train import checkpoint as ckpt


def _layer(seed=0, dtype=torch.float64, **kw) -> MoELayer:
    torch.manual_seed(seed)
    kw.setdefault("router", RouterConfig(kind="topk", k=2))
    return MoELayer(MoEConfig(d_model=16, d_expert=24, num_experts=4, **kw)).to(dtype)


def _x(T=7, seed=1, dtype=torch.float64):
    return torch.randn(T, 16, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _moe_by_hand(layer: MoELayer, router, x_TD: torch.Tensor) -> torch.Tensor:
    """sum over a token's top-k picks of weight * FFN_e(x): the plain layer, by a loop over tokens."""
    route = router(x_TD)
    y_TD = torch.zeros_like(x_TD)
    bank = layer.experts
    for t, e, w in zip(route.token_idx_N.tolist(), route.expert_idx_N.tolist(), route.weight_N, strict=True):
        y_TD[t] = y_TD[t] + w * expert_ffn(x_TD[t:t + 1], bank.w_in[e], bank.down_proj[e], bank.activation)[0]
    return y_TD


# ----------------------------------------------------------------------------- Chain-of-Experts


def test_coe_with_one_iteration_is_the_plain_layer():
    layer = _layer(iterations=1, num_shared_experts=1)
    x = _x()
    route = layer.router(x)
    ref = moe_reference(x, route.token_idx_N, route.expert_idx_N, route.weight_N, layer.experts)
    ref = ref + layer.shared_experts(x)
    assert torch.allclose(layer(x), ref, atol=1e-12)
    assert layer.routing_info().iteration_N is None and len(layer.chain_routers) == 0


@pytest.mark.parametrize("iteration_shared", [True, False])
def test_coe_two_iterations_equal_a_hand_written_two_pass_loop(iteration_shared):
    layer = _layer(iterations=2, num_shared_experts=1, iteration_shared=iteration_shared)
    x = _x().requires_grad_(True)
    y = layer(x)
    # arXiv 2506.18945: h1 = h0 + sum g E(h0) [+ shared(h0)]; h2 = h1 + sum g' E(h1) [+ shared(h1)]; out = h2 - h0
    h = x
    for t, router in enumerate([layer.router, layer.chain_routers[0]]):
        delta = _moe_by_hand(layer, router, h)
        if t == 0 or iteration_shared:
            delta = delta + layer.shared_experts(h)
        h = h + delta
    ref = h - x
    assert torch.allclose(y, ref, atol=1e-12)
    g_fast = torch.autograd.grad(y.square().sum(), [x, layer.chain_routers[0].weight, layer.experts.down_proj])
    g_ref = torch.autograd.grad(ref.square().sum(), [x, layer.chain_routers[0].weight, layer.experts.down_proj])
    assert all(torch.allclose(a, b, atol=1e-10) for a, b in zip(g_fast, g_ref, strict=True))
    info = layer.routing_info()
    assert info.iteration_N.tolist() == [0] * 14 + [1] * 14
    assert info.expert_flops == 28 * layer.cfg.expert_flops()
    assert set(info.aux) >= {"load_balance", "z_loss"}


def test_coe_aux_loss_is_one_per_iteration_gate():
    layer = _layer(iterations=2).train()
    x = _x()
    layer(x)
    total = layer.routing_info().aux["load_balance"]
    grads = torch.autograd.grad(total, [layer.router.weight, layer.chain_routers[0].weight])
    assert all(g.abs().sum() > 0 for g in grads)  # each gate gets its own balance gradient


def test_coe_config_counts_and_validation():
    cfg = MoEConfig(d_model=16, d_expert=24, num_experts=4, router=RouterConfig(kind="topk", k=1), iterations=2)
    assert cfg.expected_experts_per_token() == 2
    assert cfg.num_params() == sum(p.numel() for p in MoELayer(cfg).parameters())
    with pytest.raises(UsageError, match="MoEConfig.iterations"):
        MoEConfig(iterations=0).validate()
    with pytest.raises(UsageError, match="carries a routing state"):
        MoEConfig(iterations=2, router=RouterConfig(kind="recurrent")).validate()


def test_trace_iteration_axis_and_intra_layer_reuse():
    # One layer, E = 4: token 0 runs expert 1 in both iterations (mask 0b11) and 2 in iteration 1 only;
    # token 1 runs 0 in iteration 0 and 3 in iteration 1; token 2 runs 3 in both (one slot, one padded).
    seqs = [np.array([[[1, 2], [0, 3], [3, -1]]])]
    iters = [np.array([[[3, 2], [1, 2], [3, 0]]], dtype=np.uint8)]
    trace = RoutingTrace(seqs, 4, iterations=iters)
    # later-iteration picks: token 0 -> 1 and 2, token 1 -> 3, token 2 -> 3 (four); two of them re-used
    assert intra_layer_reuse(trace).tolist() == pytest.approx([2 / 4])
    assert intra_layer_reuse(RoutingTrace(seqs, 4)) is None
    with pytest.raises(ValueError, match="nonzero iteration mask"):
        RoutingTrace(seqs, 4, iterations=[np.zeros((1, 3, 2), dtype=np.uint8)])


def test_old_traces_load_without_an_iteration_axis(tmp_path):
    trace = RoutingTrace([np.array([[[1, 2], [0, -1]]])], 4)
    back = load_trace(save_trace(trace, tmp_path / "t.trace"))
    assert back.iterations is None
    assert [m.tolist() for m in back.iteration_masks()] == [[[[1, 1], [1, 0]]]]


# ----------------------------------------------------------------------------- zero-computation experts


def test_zero_copy_constant_experts_against_their_definitions():
    layer = _layer(router=RouterConfig(kind="topk", k=3), zero_experts=1, copy_experts=1, constant_experts=1)
    E = 4
    x = _x(T=16)
    y = layer(x)
    probs = torch.softmax(x.float() @ layer.router.weight.float().T, -1).double()  # gate math in fp32
    ref = torch.zeros_like(x)
    ffn_picks = 0
    for t in range(x.shape[0]):
        top = torch.topk(probs[t], 3).indices.tolist()
        w = probs[t, top] / probs[t, top].sum()  # the router's normalisation over its 3 picks
        keep = [(e, wi) for e, wi in zip(top, w, strict=True) if e != E]  # the zero expert (id E) is dropped
        norm = sum(wi for _, wi in keep)  # MoE++: the rest renormalised
        for e, wi in keep:
            wi = wi / norm
            if e < E:
                ffn_picks += 1
                out = expert_ffn(x[t:t + 1], layer.experts.w_in[e], layer.experts.down_proj[e], "swiglu")[0]
            elif e == E + 1:  # copy
                out = x[t]
            else:  # constant: softmax(W_c x) mixes x and v (arXiv 2410.07348)
                a = torch.softmax(layer.constant_gate[0] @ x[t], -1)
                out = a[0] * x[t] + a[1] * layer.constant_vec[0]
            ref[t] += wi * out
    assert torch.allclose(y, ref, atol=1e-6)
    info = layer.routing_info()
    assert sum(info.zero_compute.values()) + info.route.num_assignments == 3 * 16
    assert info.num_null == info.zero_compute["zero"]
    assert info.expert_flops == ffn_picks * layer.cfg.expert_flops()  # zero-computation picks cost nothing


def test_tokens_on_zero_computation_paths_count_zero_flops():
    layer = _layer(router=RouterConfig(kind="topk", k=2), zero_experts=1, copy_experts=1)
    with torch.no_grad():  # positive inputs: the zero-computation rows win, the FFN rows lose
        layer.router.weight[:4] = -1.0
        layer.router.weight[4:] = 1.0
    layer(_x().abs())
    info = layer.routing_info()
    assert info.expert_flops == 0 and info.counts_E.sum() == 0
    assert info.zero_compute == {"zero": 7, "copy": 7, "constant": 0}


def test_null_expert_router_is_top_k_with_zero_experts():
    """AdaMoE's null experts are MoE++'s zero experts: the same gate gives the same output."""
    null = _layer(router=RouterConfig(kind="null", k=2, n_null=2))
    zero = _layer(router=RouterConfig(kind="topk", k=2), zero_experts=2)
    with torch.no_grad():
        zero.experts.load_state_dict(null.experts.state_dict())
        zero.router.weight.copy_(torch.cat([null.router.weight, null.router.null_weight]))
    x = _x(T=32)
    assert torch.allclose(null(x), zero(x), atol=1e-12)
    assert null.routing_info().num_null == zero.routing_info().num_null > 0


def test_gating_residual_adds_the_previous_layers_logits():
    layer = _layer(gating_residual=True, zero_experts=1)
    x = _x()
    prev_TX = torch.randn(7, 5, dtype=torch.float32)
    layer(x, router_state=LayerCarry(logits_TX=prev_TX))
    expected = x.float() @ layer.router.weight.float().T + prev_TX @ layer.gate_map.weight.float().T
    assert torch.allclose(layer.routing_info().route.logits_TE, expected[:, :4], atol=1e-5)
    assert torch.equal(layer.routing_info().router_state.logits_TX, expected)


# ----------------------------------------------------------------------------- latent experts / MoLAE


def test_latent_dim_d_with_identity_projections_is_the_plain_layer():
    plain = _layer(num_shared_experts=1)
    latent = _layer(num_shared_experts=1, latent_dim=16)
    with torch.no_grad():
        latent.load_state_dict(plain.state_dict(), strict=False)
        latent.fc1_latent_proj.weight.copy_(torch.eye(16))
        latent.fc2_latent_proj.weight.copy_(torch.eye(16))
    x = _x()
    assert torch.allclose(latent(x), plain(x), atol=1e-12)
    assert latent.experts.d_model == 16


def test_molae_at_full_rank_reconstructs_and_lower_rank_saves_bytes():
    layer = _layer(num_shared_experts=1)
    x = _x(T=20)
    full, rep = molae_layer(layer, rank=16)
    assert rep["input_error"] < 1e-12 and rep["output_error"] < 1e-12
    assert torch.allclose(full(x), layer(x), atol=1e-10)
    low, rep8 = molae_layer(layer, rank=4)
    assert rep8["input_error"] > 0.1 and rep8["bytes_saved"] > 0
    assert low.cfg.latent_dim == 4 and low.experts.w_in.shape == (4, 48, 4)
    with pytest.raises(UsageError, match="rank"):
        molae_layer(layer, rank=17)


# ----------------------------------------------------------------------------- pre-gated routing


def _lm(seed=0, n_layers=3, **moe) -> MoELM:
    torch.manual_seed(seed)
    moe.setdefault("router", RouterConfig(kind="topk", k=2))
    cfg = LMConfig(vocab_size=256, d_model=32, n_layers=n_layers, n_heads=4, max_seq_len=96, init_std=0.2,
                   moe=MoEConfig(d_model=32, d_expert=48, num_experts=8, **moe))
    return MoELM(cfg).eval()


def test_pregated_router_reads_the_previous_moe_layers_input():
    model = _lm(pregated=True)
    inputs = []
    hooks = [m.register_forward_pre_hook(lambda _m, args: inputs.append(args[0].reshape(-1, 32)))
             for m in model.moe_layers()]
    model(torch.randint(0, 256, (2, 9)))
    for h in hooks:
        h.remove()
    layers = model.moe_layers()
    for i, layer in enumerate(layers):
        gate_in = inputs[max(i - 1, 0)]  # the first layer reads its own input
        expected = layer.router(gate_in)
        got = layer.routing_info().route
        assert torch.equal(got.expert_idx_N, expected.expert_idx_N)


def test_pregated_offloaded_generation_prefetches_exactly_what_runs(tmp_path):
    model = _lm(pregated=True)
    prompt = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(2))
    store = write_store(model, tmp_path / "store")
    with offload(model, store, "50%", "predictive") as rt:
        _, _, trace = decode_loop(model, prompt, 12, runtime=rt)
        predictions = list(rt.predictions)
    predicted = {(f, layer): set(order) for f, layer, order in predictions}
    checked = 0
    for f in range(1, len(trace.seqs)):  # decode forwards (forward 0 is the prefill)
        for layer in range(1, trace.num_layers):
            ran = set(trace.seqs[f][layer][trace.seqs[f][layer] >= 0].tolist())
            assert ran <= predicted[(f, layer)], (f, layer)  # recall 100 %
            assert predicted[(f, layer)] <= ran  # and nothing else
            checked += 1
    assert checked == 11 * 2


# ----------------------------------------------------------------------------- every architecture end to end

ARCHS = {
    "coe": dict(router=RouterConfig(kind="topk", k=1), iterations=2, num_shared_experts=1),
    "moepp": dict(router=RouterConfig(kind="topk", k=3), zero_experts=1, copy_experts=1, constant_experts=2,
                  gating_residual=True),
    "latent": dict(router=RouterConfig(kind="topk", k=2), latent_dim=16),
    "pregated": dict(router=RouterConfig(kind="topk", k=2), pregated=True),
}


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_architecture_saves_loads_traces_offloads_and_reroutes(arch, tmp_path):
    model = _lm(**ARCHS[arch])
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(ids)
    # save / load: the config through JSON, the weights through a checkpoint
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ckpt.save_checkpoint(tmp_path / "run", 1, model, opt, config={"model": model.cfg.to_dict()}, meta={})
    cfg = LMConfig.from_dict(model.cfg.to_dict())
    assert cfg == model.cfg
    back = MoELM(cfg).eval()
    ckpt.load_model_weights(ckpt.latest_checkpoint(tmp_path / "run"), back)
    with torch.no_grad():
        assert torch.equal(back(ids), ref)
    # trace
    trace = record_trace(model, [TokenBatch(ids, ["python", "german"])])
    assert trace.num_layers == 3 and (trace.iterations is not None) == (arch == "coe")
    back_trace = load_trace(save_trace(trace, tmp_path / "t.trace"))
    if arch == "coe":
        assert all(np.array_equal(a, b) for a, b in zip(back_trace.iterations, trace.iterations, strict=True))
        assert all(0 <= r <= 1 for r in intra_layer_reuse(back_trace))
    # offload: greedy generation equals resident generation
    prompt = ids[:1, :6]
    r = offloaded_generate(model, prompt, 8, "50%", "predictive")
    assert torch.equal(r.ids_BT, generate(model, prompt, 8))
    assert r.metrics["dense_bytes"] > 0
    # re-route: every router of the layer takes the change, and it is undone on exit
    with moekit.route(model, kind="topp", p=0.3, min_k=1):
        with torch.no_grad():
            model(ids)
        assert all(r.cfg.kind == "topp" for layer in model.moe_layers() for r in layer.iteration_routers())
    assert all(r.cfg.kind == "topk" for layer in model.moe_layers() for r in layer.iteration_routers())
    with torch.no_grad():
        assert torch.equal(model(ids), ref)


def test_molae_model_converts_every_layer_and_keeps_its_config():
    model = _lm()
    new, reports = molae_model(model, rank=32)
    ids = torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        assert torch.allclose(new(ids), model(ids), atol=1e-4)
    assert len(reports) == 3 and new.cfg.moe.latent_dim == 32 and model.cfg.moe.latent_dim is None
    assert new.cfg.num_params() == sum(p.numel() for p in new.parameters())
    assert dataclasses.replace(new.cfg.moe, latent_dim=None) == model.cfg.moe


def test_zero_computation_experts_are_never_predicted_nor_counted_resident():
    from moekit.offload.runtime import token_experts
    from moekit.routers.predict import predict_experts

    model = _lm(**ARCHS["moepp"])
    layer = model.moe_layers()[1]
    with torch.no_grad():
        layer.router.weight[8:] += 5.0 * layer.router.weight[:8].mean(0)  # make zero-computation picks common
    x = torch.randn(64, 32)
    raw = layer.router(x).expert_idx_N
    assert bool((raw >= 8).any())
    pred = predict_experts(layer.router, x, layer.cfg.num_experts)
    assert int(pred.max()) < 8
    assert token_experts(layer) == 2  # top-3 of 12 slots, 8 of them FFN experts: 2 at balance


def test_evaluate_reports_zero_computation_picks_per_layer_and_domain():
    from moekit.data import ByteTokenizer
    from moekit.train.evaluate import evaluate

    model = _lm(**ARCHS["moepp"])
    res = evaluate(model, ByteTokenizer(), seq_len=16, max_tokens_per_domain=32, domains=["python", "german"])
    for domain in ("python", "german"):
        per_layer = res["per_domain"][domain]["zero_compute_per_token_by_layer"]
        assert len(per_layer) == 3 and all(0 < z <= 3 for z in per_layer)
        # every pick is an FFN expert or a zero-computation one: 3 per token
        ffn = res["per_domain"][domain]["experts_per_token_by_layer"]
        assert all(f + z == pytest.approx(3) for f, z in zip(ffn, per_layer, strict=True))


def test_analysis_metrics_report_intra_layer_reuse_of_a_coe_model():
    from moekit.analysis.report.tasks import AnalysisConfig, compute_metrics

    model = _lm(**ARCHS["coe"])
    ids = torch.randint(0, 256, (4, 24), generator=torch.Generator().manual_seed(5))
    trace = record_trace(model, [TokenBatch(ids, ["python", "german", "python", "german"])])
    m = compute_metrics(trace, AnalysisConfig(workers=1, n_boot=4, srp_n=(4,), sch_n=(4,), model_sch_n=(4,),
                                              max_multiple=2, model_multiples=(1,)), progress=False)
    assert m["intra_layer_reuse"] == pytest.approx(intra_layer_reuse(trace).tolist(), abs=1e-5)
    assert max(m["intra_layer_reuse"]) > 0
    assert len(m["intra_layer_reuse"]) == 3
    plain = record_trace(_lm(), [TokenBatch(ids, ["python", "german", "python", "german"])])
    assert "intra_layer_reuse" not in compute_metrics(plain, AnalysisConfig(
        workers=1, n_boot=4, srp_n=(4,), sch_n=(4,), model_sch_n=(4,), max_multiple=2, model_multiples=(1,)),
        progress=False)


def test_expert_masks_reach_every_iteration_router():
    model = _lm(**ARCHS["coe"])
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(6))
    with moekit.mask_experts(model, disabled={0: [0, 1, 2, 3, 4, 5]}), torch.no_grad():
        model(ids)
        ran = model.moe_layers()[0].routing_info().route.expert_idx_N
        assert set(ran.tolist()) <= {6, 7} and ran.numel() == 2 * 32  # both iterations, enabled experts only
    assert all(r.expert_mask_E is None for r in model.moe_layers()[0].iteration_routers())


def test_step_updates_reach_every_iteration_router_and_zero_experts_refuse_a_bias():
    from moekit.train.balance import BalanceTracker

    layer = _layer(dtype=torch.float32, iterations=2, router=RouterConfig(kind="topk", k=1, bias_update_rate=0.1))
    BalanceTracker(layer)
    layer.train()
    layer(_x(dtype=torch.float32)).sum().backward()
    moekit.after_optimizer_step(layer)
    biases = [r.e_score_correction_bias for r in layer.iteration_routers()]
    assert all(b.abs().sum() > 0 for b in biases)
    with pytest.raises(UsageError, match="bias_update_rate"):
        MoEConfig(zero_experts=1, router=RouterConfig(kind="topk", k=2, bias_update_rate=0.1)).validate()


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_export_to_transformers_refuses_the_architectures(arch):
    from moekit.hf.export import ExportError, hf_config_for

    with pytest.raises(ExportError, match="plain MoE layer"):
        hf_config_for(_lm(**{**ARCHS[arch], "router": RouterConfig(kind="topk", k=2)}).cfg)
