"""ReMoE (arXiv 2412.14711; reference thu-ml/ReMoE): ReLU gates give a variable number of experts per
token; an adaptive L1 coefficient steers the average to the target k. It works with the layer, the
trainer's step hook, `moekit.route`, masks, traces, offload, export refusal and `moekit compare`."""

import json

import pytest
import torch
from torch import nn

import moekit
from moekit.models import LMConfig, MoELM
from moekit.routers.base import StepCounts
from moekit.routers.remoe import ReMoEConfig, ReMoERouter

E, D = 8, 16


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny shapes: one intra-op thread is fastest (and does not stall on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def router(**kw) -> ReMoERouter:
    return ReMoERouter(moekit.RouterConfig(kind="remoe", **kw).validate(E), D, E)


def layer(**kw) -> moekit.MoELayer:
    return moekit.MoELayer(moekit.MoEConfig(d_model=D, d_expert=8, num_experts=E,
                                            router=moekit.RouterConfig(kind="remoe", **kw)))


def tiny_lm(**router_kw) -> MoELM:
    torch.manual_seed(0)
    moe = moekit.MoEConfig(d_model=32, d_expert=16, num_experts=E, router=moekit.RouterConfig(**router_kw))
    return MoELM(LMConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, max_seq_len=32, init_std=0.2, moe=moe))


# --------------------------------------------------------------------------------------- the rule
def test_gates_are_the_relu_of_the_logits_and_every_open_gate_routes():
    r = router()
    x = torch.randn(50, D)
    out = r(x)
    gates_TE = torch.relu(x @ r.weight.T)
    assert isinstance(r.cfg, ReMoEConfig) and r.cfg == moekit.RouterConfig(kind="remoe")
    torch.testing.assert_close(out.scores_TE, gates_TE)
    opened = gates_TE > 0
    assert out.num_assignments == int(opened.sum())
    assert bool(opened[out.token_idx_N, out.expert_idx_N].all())
    torch.testing.assert_close(out.weight_N, gates_TE[out.token_idx_N, out.expert_idx_N])  # raw gates, no softmax
    per_token = out.experts_per_token_T()
    assert per_token.min() < per_token.max()  # a variable number of experts per token


def test_a_token_with_no_open_gate_gets_zero_output_and_the_task_gradient_reaches_the_gate():
    moe = layer()
    x = torch.randn(6, D)
    with torch.no_grad():
        moe.router.weight[:] = -moe.router.weight.abs()
        x[0] = x[0].abs()  # token 0: every logit <= 0, so no expert
    y = moe(x)
    info = moe.routing_info()
    assert info.experts_per_token_T[0] == 0 and not y[0].any()
    moe.zero_grad()
    moe(torch.randn(16, D)).pow(2).sum().backward()  # task loss only: ReLU routing is differentiable
    assert moe.router.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------- the L1 penalty
def reference_l1(gates_TE, k, coef):
    """Megatron-LM's switch_load_balancing_loss_func(relu, routing_map.sum(0), topk=k, coeff), as the
    reference ReLURouter.apply_l1_reg calls it."""
    T, n = gates_TE.shape
    tokens_per_expert = (gates_TE > 0).sum(0)
    return torch.sum(gates_TE.sum(0) * tokens_per_expert) * (n * coef / (T * T * k))


def test_the_load_balanced_l1_equals_the_reference_and_the_plain_one_the_mean_l1_norm():
    moe = layer(k=3, l1_coef_init=0.5)
    x = torch.randn(2, 10, D)
    moe(x)
    gates_TE = moe.routing_info().route.scores_TE
    l1 = moe.routing_info().aux["l1_reg"]
    torch.testing.assert_close(l1, reference_l1(gates_TE, 3, 0.5))
    assert l1.requires_grad
    plain = layer(k=3, l1_coef_init=0.5, l1_balance=False)
    plain.load_state_dict(moe.state_dict())
    plain(x)
    torch.testing.assert_close(plain.routing_info().aux["l1_reg"], 0.5 * gates_TE.sum(-1).mean())


def test_padding_is_excluded_and_an_empty_batch_costs_nothing():
    moe = layer(l1_coef_init=1.0)
    x = torch.randn(2, 6, D)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 2:] = False
    moe(x, padding_mask=mask)
    padded = moe.routing_info().aux["l1_reg"]
    moe(x[mask].unsqueeze(0))
    torch.testing.assert_close(padded, moe.routing_info().aux["l1_reg"])
    moe(torch.randn(0, D, requires_grad=True))
    assert float(moe.routing_info().aux["l1_reg"].detach()) == 0.0


# ------------------------------------------------------------------------------- the adaptive lambda
def counts(chosen: int, tokens: int) -> StepCounts:
    return StepCounts(torch.zeros(E, dtype=torch.int64), torch.tensor([chosen] + [0] * (E - 1)), tokens)


@pytest.mark.parametrize("active,factor", [
    ((40, 24), 1.2),      # sparsity (0.5 + 0.7) / 2 = 0.6 < 1 - 2/8: lambda *= alpha
    ((20, 16), 1 / 1.2),  # (0.75 + 0.8) / 2 > 0.75: lambda /= alpha
    ((20, 20), 1 / 1.2),  # exactly the target: the reference's `<` shrinks it
])
def test_lambda_follows_the_mean_sparsity_of_all_layers(active, factor):
    routers = [router(l1_coef_init=1e-3), router(l1_coef_init=1e-3)]
    ReMoERouter.after_optimizer_step_all(routers, [counts(a, 10) for a in active])
    for r in routers:  # one lambda for the model, as the reference's single coefficient
        torch.testing.assert_close(r.l1_coef, torch.tensor(1e-3 * factor))
    ReMoERouter.after_optimizer_step_all(routers, [counts(0, 0), counts(0, 0)])  # nothing routed: kept
    torch.testing.assert_close(routers[0].l1_coef, torch.tensor(1e-3 * factor))


def test_lambda_compares_with_each_layers_own_target_when_k_differs_by_layer():
    """Per-layer k (route(k=[...]), per-layer configs): the target is the layers' mean 1 - k_l/E, not
    layer 0's. Layer 0 wants k=1 (S* = 0.875), layer 1 k=4 (S* = 0.5): mean target 0.6875."""
    routers = [router(k=1, l1_coef_init=1e-3), router(k=4, l1_coef_init=1e-3)]
    # 10 tokens; 10 and 30 active: sparsity (0.875 + 0.625) / 2 = 0.75 >= 0.6875, so lambda shrinks
    # (layer 0's target alone, 0.875, would have grown it).
    ReMoERouter.after_optimizer_step_all(routers, [counts(10, 10), counts(30, 10)])
    torch.testing.assert_close(routers[1].l1_coef, torch.tensor(1e-3 / 1.2))


def test_the_optimizer_step_adapts_lambda_so_the_average_falls_to_the_target_k():
    """Closed loop through the trainer's step hook: a layer that starts with about half of its 8 experts
    open; every optimiser step multiplies lambda by alpha while tokens use more than k = 2 experts on
    average and divides it once they use k or fewer. (Inputs have a non-zero mean, as hidden states do:
    with zero-mean inputs and no bias, any gate is open for half of the tokens whatever its weights.)"""
    torch.manual_seed(0)
    moe = layer(k=2, l1_coef_init=1e-3, l1_coef_multiplier=1.2)
    opt = torch.optim.Adam(moe.parameters(), lr=1e-2)
    moekit.BalanceTracker(moe).attach(opt)
    target = nn.Linear(D, D)
    means, coefs = [], [float(moe.router.l1_coef)]
    for _ in range(40):
        x = torch.randn(64, D) + 1.0
        loss = (moe(x) - target(x).detach()).pow(2).mean() + moe.routing_info().aux["l1_reg"]
        loss.backward()
        opt.step()  # the hook updates lambda from this step's counts
        opt.zero_grad()
        means.append(moe.routing_info().stats()["experts_per_token_mean"])
        coefs.append(float(moe.router.l1_coef))
    for mean, before, after in zip(means, coefs, coefs[1:], strict=False):
        assert after == pytest.approx(before * (1.2 if mean > 2 else 1 / 1.2), rel=1e-5), (mean, before, after)
    assert means[0] > 3 and min(means) <= 2  # dense at first, then as sparse as the target


def test_lambda_is_fp32_state_that_checkpoints_keep():
    moe = layer(l1_coef_init=3e-7)
    assert "router.l1_coef" in moe.state_dict()
    moe.router.l1_coef.fill_(0.123456789)
    assert moe.to(torch.bfloat16).router.l1_coef.dtype == torch.float32
    assert float(moe.router.l1_coef) == pytest.approx(0.123456789, rel=1e-7)


# --------------------------------------------------------------------------- works everywhere
def test_route_override_masks_and_capabilities():
    model = tiny_lm(kind="topk", k=2)
    ids = torch.randint(0, 64, (2, 12))
    with moekit.route(model, kind="remoe", l1_balance=False) as layers, torch.no_grad():
        assert all(isinstance(m.router, ReMoERouter) for m in layers)
        assert layers[0].router.weight is model.moe_layers()[0].router.weight  # the same gate Parameter
        model(ids)
        assert layers[0].routing_info().experts_per_token_T.max() > 2  # ReLU opens more than top-2
        with moekit.mask_experts(model, disabled={0: [0, 1]}):
            model(ids)
            assert not (layers[0].routing_info().route.expert_idx_N < 2).any()
        with pytest.raises(ValueError, match="router kind 'remoe', whose selection rule does not rank forced"):
            with moekit.mask_experts(model, forced={0: [1]}):
                pass
    cfg = moekit.RouterConfig(kind="remoe", k=2)
    assert cfg.min_resident_experts(E) == 2 and cfg.hf_routing() is None and not cfg.carries_state()
    assert moekit.layers.moe.aux_loss_names(moekit.MoEConfig(router=cfg))[-1] == "l1_reg"
    from moekit.hf.export import ExportError, hf_config_for
    with pytest.raises(ExportError, match="'remoe' router"):
        hf_config_for(tiny_lm(kind="remoe").cfg)


def test_trace_and_offloaded_generation(tmp_path):
    from moekit.analysis.trace import record_trace
    from moekit.models.generate import generate
    from moekit.offload.generate import offloaded_generate

    model = tiny_lm(kind="remoe", k=2).eval()
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))
    trace = record_trace(model, [(ids, ["a", "b"])], gate_lookahead=1)
    with torch.no_grad():
        model(ids)
    for i, m in enumerate(model.moe_layers()):
        executed, _ = m.routing_info().executed.to_padded()
        recorded = trace.seqs[1][i]
        assert (recorded >= 0).sum() == (executed[10:] >= 0).sum()  # the second sequence's experts
    assert trace.prefetch and any(p.size for p in trace.prefetch[1])  # the gate look-ahead predicts ReMoE
    prompt = ids[:1, :6]
    resident = generate(model, prompt, 8)
    r = offloaded_generate(model, prompt, 8, "50%", "lru")
    assert torch.equal(r.ids_BT, resident)


def test_flags_configure_remoe():
    import argparse

    from moekit.cli.flags import add_config_flags, apply_flags
    from moekit.errors import UsageError
    from moekit.train.presets import preset

    parser = argparse.ArgumentParser()
    add_config_flags(parser)
    model_cfg, _ = apply_flags(*preset("topk"), parser.parse_args(
        ["--router.kind", "remoe", "--router.l1_coef_multiplier", "1.5"]))
    assert model_cfg.moe.router == moekit.RouterConfig(kind="remoe", k=2, l1_coef_multiplier=1.5)
    with pytest.raises(UsageError, match="--router.l1_balance does not apply to router kind 'topk'"):
        apply_flags(*preset("topk"), parser.parse_args(["--router.l1_balance", "false"]))


def test_the_remoe_preset_trains_and_compares(tmp_path):
    """`moekit compare` with the remoe preset's recipe (shrunk): lambda moves, l1_reg is trained and logged."""
    import dataclasses

    from moekit.train.compare import compare
    from moekit.train.presets import preset
    from moekit.train.trainer import read_metrics

    def small(name):
        model_cfg, train_cfg = preset(name)
        moe = dataclasses.replace(model_cfg.moe, d_model=32, d_expert=32)
        model_cfg = dataclasses.replace(model_cfg, d_model=32, n_layers=2, n_heads=2, moe=moe)
        return model_cfg, dataclasses.replace(train_cfg, steps=6, micro_batch=2, seq_len=32, warmup_steps=1,
                                              eval_tokens=256, checkpoint_every=6, threads=1)

    report = compare({name: small(name) for name in ("topk", "remoe")}, tmp_path / "cmp", progress=False,
                     log=lambda *_: None)
    row = report["runs"]["remoe"]
    assert row["router"].startswith("remoe(target k=2") and row["experts_per_token"] > 0
    rows = read_metrics(tmp_path / "cmp" / "remoe" / "metrics.jsonl")
    assert all("l1_reg" in r for r in rows)
    model = moekit.train.load_trained(tmp_path / "cmp" / "remoe")[0]
    assert float(model.moe_layers()[0].router.l1_coef) != pytest.approx(1e-8)  # 6 steps of updates
    assert "| remoe |" in (tmp_path / "cmp" / "compare.md").read_text()
    assert json.loads((tmp_path / "cmp" / "compare.json").read_text())["runs"]["remoe"]["router"] == row["router"]
