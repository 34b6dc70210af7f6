"""MoELayer invariants and the fast path against the reference loop."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import moekit
from moekit.dispatch import combine, make_plan, permute
from moekit.ops import grouped


def test_one_expert_top1_equals_dense_ffn(make_cfg):
    layer = moekit.MoELayer(make_cfg(num_experts=1, k=1))
    x = torch.randn(3, 5, 32)
    w_gu, w_d = layer.experts.gate_up_proj[0], layer.experts.down_proj[0]
    g, u = F.linear(x, w_gu).chunk(2, -1)
    torch.testing.assert_close(layer(x), F.linear(F.silu(g) * u, w_d))


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("kind", ["topk", "expert_choice"])
def test_grouped_loop_equals_reference_forward_backward_float64(make_cfg, activation, kind, reference_twin):
    """float64 runs the grouped path's loop (the kernel takes no float64; asserted): the dispatch,
    permutation and combine are checked exactly here, the kernel in fp32 below."""
    fast = moekit.MoELayer(make_cfg(activation=activation, kind=kind, num_shared_experts=1, shared_gate=True)).double()
    ref = reference_twin(fast)
    x = torch.randn(2, 9, 32, dtype=torch.float64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    g = torch.randn(2, 9, 32, dtype=torch.float64)
    with grouped.record() as ran:
        y = fast(x)
        (y * g).sum().backward()
    assert ran == {(stage, "loop"): 2 for stage in grouped.STAGES}  # the up (or gate_up) and down GEMMs
    with grouped.record() as ran_ref:
        y2 = ref(x2)
        (y2 * g).sum().backward()
    assert not ran_ref  # the reference never touches the grouped path
    torch.testing.assert_close(y, y2, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-12, rtol=1e-12)
    for (n, p), p2 in zip(fast.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, p2.grad, atol=1e-12, rtol=1e-12, msg=n)


def assert_layers_match(layer, ref, x, atol, rtol):
    x2 = x.detach().clone().requires_grad_()
    y, y_ref = layer(x), ref(x2)
    torch.testing.assert_close(y, y_ref, atol=atol, rtol=rtol)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (y_ref * g).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, atol=10 * atol, rtol=10 * rtol)
    for (n, p), p2 in zip(layer.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, p2.grad, atol=10 * atol, rtol=10 * rtol, msg=n)


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("path", grouped.PATHS)
def test_grouped_fp32_equals_reference_on_each_path(make_cfg, activation, path, reference_twin):
    layer = moekit.MoELayer(make_cfg(num_experts=8, k=2, activation=activation))
    with grouped.force(path) as ran:
        assert_layers_match(layer, reference_twin(layer), torch.randn(64, 32, requires_grad=True), 1e-5, 1e-5)
    # Both expert GEMMs ran on `path` forward, for dx and for dw ("loop_wx", "loop_numpy": forward; dx, dw run the loop):
    # the comparison is of that path.
    assert ran == {(stage, "loop" if path in ("loop_wx", "loop_numpy") and stage != "forward" else path): 2 for stage in grouped.STAGES}


def test_dropless_equals_capacity_when_nothing_dropped(make_cfg):
    a = moekit.MoELayer(make_cfg(k=2))
    b = moekit.MoELayer(make_cfg(k=2, capacity_factor=4.0))  # capacity = all assignments
    b.load_state_dict(a.state_dict())
    x = torch.randn(16, 32)
    torch.testing.assert_close(a(x), b(x))
    assert b.routing_info().num_dropped == 0


def test_capacity_drops_are_counted_and_zero(make_cfg):
    layer = moekit.MoELayer(make_cfg(num_experts=4, k=1, capacity_factor=0.5))
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[2, 0] = 100.0  # every token with x[0] > 0 picks expert 2
    x = torch.randn(40, 32)
    x[:, 0] = x[:, 0].abs() + 0.1
    y = layer(x)
    info = layer.routing_info()
    capacity = 5  # ceil(0.5 * 40 / 4)
    assert info.num_dropped == 40 - capacity
    assert info.counts_E.tolist() == [0, 0, capacity, 0]
    assert info.stats()["dropped_rate"] == pytest.approx(35 / 40)
    # the first `capacity` tokens (token order) keep their expert; the rest get zero MoE output
    assert bool((y[capacity:] == 0).all()) and bool((y[:capacity] != 0).any())


def test_identity_experts_return_input_times_weight_sum():
    x = torch.randn(6, 8)
    token = torch.tensor([0, 0, 1, 3, 3, 3, 5])
    expert = torch.tensor([1, 2, 0, 0, 1, 2, 2])
    weight = torch.rand(7)
    plan = make_plan(token, expert, weight, 3)
    y = combine(permute(x, plan), plan, 6, x.dtype)  # identity experts
    wsum = torch.zeros(6).index_add(0, token, weight)
    torch.testing.assert_close(y, x * wsum.unsqueeze(-1))


def test_expert_with_zero_tokens_and_single_token(make_cfg):
    layer = moekit.MoELayer(make_cfg(num_experts=8, k=1))
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[5, 0] = 50.0
    x = torch.randn(1, 32)
    x[0, 0] = 1.0
    y = layer(x)  # T = 1, seven experts get no token
    assert y.shape == (1, 32)
    assert layer.routing_info().counts_E.tolist() == [0, 0, 0, 0, 0, 1, 0, 0]
    y.sum().backward()
    gw = layer.experts.gate_up_proj.grad
    assert bool(gw[5].abs().sum() > 0) and not gw[torch.arange(8) != 5].any()


def test_eval_updates_no_statistics_or_bias(make_cfg):
    layer = moekit.MoELayer(make_cfg(score="sigmoid", bias_update_rate=0.01))
    tracker = moekit.BalanceTracker(layer)
    x = torch.randn(20, 32)
    layer.eval()
    layer(x)
    assert not tracker.counts(layer).executed_E.any()
    moekit.after_optimizer_step(layer)
    assert not layer.router.e_score_correction_bias.any()
    layer.train()
    layer(x)
    assert int(tracker.counts(layer).executed_E.sum()) == 40
    moekit.after_optimizer_step(layer)
    assert layer.router.e_score_correction_bias.abs().sum() > 0
    assert not tracker.counts(layer).executed_E.any()  # reset after the update


def test_activation_checkpointing_counts_once(make_cfg):
    layer = moekit.MoELayer(make_cfg(score="sigmoid", bias_update_rate=0.01))
    tracker = moekit.BalanceTracker(layer)
    x = torch.randn(10, 32, requires_grad=True)
    y = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False)
    y.sum().backward()
    assert int(tracker.counts(layer).executed_E.sum()) == 20


def test_padding_excluded_from_compute_losses_and_stats(make_cfg):
    layer = moekit.MoELayer(make_cfg(k=2))
    x = torch.randn(2, 6, 32)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 3:] = False
    y = layer(x, padding_mask=mask)
    info = layer.routing_info()
    assert info.num_tokens == 9 and int(info.counts_E.sum()) == 18
    assert bool((y[1, 3:] == 0).all())
    # the losses equal those of the valid tokens alone
    layer(x[mask].unsqueeze(0))
    alone = layer.routing_info()
    torch.testing.assert_close(info.aux["load_balance"], alone.aux["load_balance"])
    torch.testing.assert_close(info.aux["z_loss"], alone.aux["z_loss"])


def test_routing_info_stats_and_aux(make_cfg):
    layer = moekit.MoELayer(make_cfg(k=2))
    with pytest.raises(RuntimeError, match="no forward"):
        layer.routing_info()
    layer(torch.randn(2, 5, 32))
    info = layer.routing_info()
    s = info.stats()
    assert s["experts_per_token_mean"] == 2.0 and s["experts_per_token_hist"] == [0, 0, 10]
    assert set(info.aux) == {"load_balance", "z_loss", "seq_balance"}
    assert info.aux["load_balance"].requires_grad


def test_bad_input_shapes(make_cfg):
    layer = moekit.MoELayer(make_cfg())
    with pytest.raises(ValueError, match="d_model=32"):
        layer(torch.randn(4, 16))
    with pytest.raises(ValueError, match="padding_mask shape"):
        layer(torch.randn(2, 4, 32), padding_mask=torch.ones(2, 5))


def test_repr_says_what_it_is(make_cfg):
    text = repr(moekit.MoELayer(make_cfg(num_shared_experts=1)))
    for part in ("topk", "k=2", "E=4", "shared=1", "active_params="):
        assert part in text


@settings(max_examples=40, deadline=None)
@given(T=st.integers(1, 24), E=st.integers(1, 64), data=st.data())
def test_property_grouped_equals_reference(reference_twin, T, E, data):
    k = data.draw(st.integers(1, E))
    path = data.draw(st.sampled_from(grouped.PATHS))
    cfg = moekit.MoEConfig(d_model=16, d_expert=16, num_experts=E, router=moekit.RouterConfig(k=k))
    layer = moekit.MoELayer(cfg)
    with grouped.force(path) as ran:
        assert_layers_match(layer, reference_twin(layer), torch.randn(T, 16, requires_grad=True), 1e-5, 1e-4)
    assert ran == {(stage, "loop" if path in ("loop_wx", "loop_numpy") and stage != "forward" else path): 2 for stage in grouped.STAGES}
    info = layer.routing_info()
    assert int(info.counts_E.sum()) == T * k
    assert info.counts_E.numel() == E


def test_aux_losses_only_when_autograd_records(make_cfg):
    layer = moekit.MoELayer(make_cfg())
    with torch.no_grad():
        layer(torch.randn(5, 32))
    info = layer.routing_info()
    assert info.aux == {} and info.stats()["experts_per_token_mean"] == 2.0


# ------------------------------------------------------------ capacity is a training device (issue 11, item 7)
def test_eval_mode_never_drops_unless_eval_capacity_factor_asks(make_cfg):
    layer = moekit.MoELayer(make_cfg(num_experts=4, k=1, capacity_factor=0.5))
    dropless = moekit.MoELayer(make_cfg(num_experts=4, k=1))
    dropless.load_state_dict(layer.state_dict())
    with torch.no_grad():
        layer.router.weight[2, 0] = 100.0  # most tokens pick expert 2
        dropless.router.weight[2, 0] = 100.0
    x = torch.randn(40, 32)
    x[:, 0] = x[:, 0].abs() + 0.1
    layer(x)
    assert layer.routing_info().num_dropped > 0  # training drops
    layer.eval()
    with torch.no_grad():
        y = layer(x)
    assert layer.routing_info().num_dropped == 0
    torch.testing.assert_close(y, dropless.eval()(x))
    explicit = moekit.MoELayer(make_cfg(num_experts=4, k=1, capacity_factor=0.5, eval_capacity_factor=0.5)).eval()
    explicit.load_state_dict(layer.state_dict())
    with torch.no_grad():
        explicit(x)
    assert explicit.routing_info().num_dropped == 35


# ------------------------------------------------------------------------ empty input (issue 11, item 13)
@pytest.mark.parametrize("padded", [False, True], ids=["no_mask", "mask"])
@pytest.mark.parametrize("kind", moekit.registered_routers())
def test_empty_input_gives_empty_output_and_zero_aux_losses(make_cfg, kind, padded):
    cfg = make_cfg(kind=kind)  # every registered router, with its config's defaults
    layer = moekit.MoELayer(cfg).train()
    state = cfg.router.initial_state(cfg.router.build_shared_module())  # None for routers without one
    # (B, 0, D), with or without a (B, 0) mask; with a mask also a batch that is all padding
    for T in [0, 3] if padded else [0]:
        x = torch.randn(2, T, 32, requires_grad=True)
        mask = torch.zeros(2, T, dtype=torch.bool) if padded else None
        if cfg.router.routes_on_token_ids():  # hash routing: the model hands the layer its token ids
            state = torch.zeros(2, T, dtype=torch.int64)
        y = layer(x, mask, router_state=state)
        assert y.shape == (2, T, 32) and not y.any()
        aux = layer.routing_info().aux
        assert {"load_balance", "z_loss", "seq_balance"} <= set(aux)
        assert all(float(v.detach()) == 0.0 for v in aux.values()), aux
        (y.sum() + sum(aux.values())).backward()  # and backward runs
        assert layer.routing_info().stats()["tokens"] == 0


def test_the_layer_calls_no_collective_and_no_private_torch_api():
    """Step state, collectives and "am I inside backward" live in moekit.train.balance / moekit.utils."""
    import ast
    import inspect

    from moekit.layers import moe

    def chain(node):
        parts = []
        while isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        return ".".join([getattr(node, "id", "?"), *reversed(parts)])

    tree = ast.parse(inspect.getsource(moe))
    used = {chain(n) for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    assert not {u for u in used if u.startswith(("torch.distributed", "torch._", "dist."))}  # any private torch name
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    from_torch = {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module == "torch" for a in n.names}
    assert not any(m.startswith(("torch.distributed", "torch._", "moekit.train", "moekit.utils.autograd")) for m in imported)
    assert not {a for a in from_torch if a == "distributed" or a.startswith("_")}
    layer = moekit.MoELayer(moekit.MoEConfig())  # no step counters: the only buffer is the selection bias
    assert [n for n, _ in layer.named_buffers()] == ["router.e_score_correction_bias"]
