"""MoELayer's inference path (`_inference_forward`) against its reference, the general forward: the same
output bit for bit and the same RoutingInfo, taken only with autograd off (training always runs the
general path, whose backward is tested elsewhere), and the grad-mode forward equal to it."""

from __future__ import annotations

import pytest
import torch

from moekit.config import MoEConfig, RouterConfig
from moekit.layers.moe import MoELayer, _DenseRoute, reference_path

CASES = {
    "softmax": (dict(kind="topk", k=2), {}),
    "softmax-k1": (dict(kind="topk", k=1), {}),
    # DeepSeek-V3: sigmoid scores, a (non-zero) selection bias, group-limited selection, scaling, a shared expert
    "deepseek_v3": (dict(kind="topk", k=4, score="sigmoid", n_group=4, topk_group=2, routed_scaling_factor=2.5),
                    dict(num_shared_experts=1)),
    # Qwen2-MoE: a sigmoid-gated shared expert, weights not renormalised
    "qwen2_moe": (dict(kind="topk", k=2, normalize=False), dict(num_shared_experts=1, shared_gate=True)),
    "dbrx-p2": (dict(kind="topk", k=2, normalize_p=2.0), {}),
    "bias-on-logits": (dict(kind="topk", k=2, selection_bias_on="logits"), {}),
    # Llama 4: sigmoid of the top-1 logit, not renormalised, multiplying the expert's input; a shared expert
    "llama4": (dict(kind="topk", k=1, score="sigmoid", normalize=False), dict(num_shared_experts=1, weight_on_input=True)),
    # gpt-oss: a softmax over the top k of the logits (with a selection bias: picked on the biased logits)
    "softmax-after-topk": (dict(kind="topk", k=2, softmax_after_topk=True), {}),
    # "-nobias": the router holds no selection bias (moekit.hf for routers without one): topk's own values
    "softmax-after-topk-nobias": (dict(kind="topk", k=3, softmax_after_topk=True), {}),
    "softmax-nobias": (dict(kind="topk", k=2), {}),
}


def _layer(name: str, dtype=torch.float32) -> MoELayer:
    rc, extra = CASES[name]
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(d_model=32, num_experts=8, d_expert=16, router=RouterConfig(**rc), **extra))
    with torch.no_grad():
        if name.endswith("-nobias"):
            layer.router.drop_selection_bias()
        else:
            layer.router.e_score_correction_bias.normal_(0, 0.1)  # a selection bias that changes choices
    return layer.to(dtype).eval()


def _same_info(a, b) -> None:
    for field in ("token_idx_N", "expert_idx_N", "weight_N", "scores_TE", "logits_TE"):
        assert torch.equal(getattr(a.route, field), getattr(b.route, field)), field
        assert torch.equal(getattr(a.executed, field), getattr(b.executed, field)), field
    assert torch.equal(a.counts_E, b.counts_E) and a.counts_E.dtype == b.counts_E.dtype
    assert (a.num_dropped, a.num_tokens, a.num_null, a.expert_flops, a.router_state, a.iteration_N) == \
        (b.num_dropped, b.num_tokens, b.num_null, b.expert_flops, b.router_state, b.iteration_N)
    assert dict(a.aux) == dict(b.aux) == {} and dict(a.zero_compute) == dict(b.zero_compute)
    assert a.stats() == b.stats()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(CASES))
def test_inference_path_matches_reference(name, dtype):
    layer = _layer(name, dtype)
    x = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(1)).to(dtype)
    with torch.no_grad():
        y = layer(x)
        assert isinstance(layer._info, _DenseRoute)  # the inference path ran
        fast_info = layer.routing_info()
        with reference_path():
            y_ref = layer(x)
        assert not isinstance(layer._info, _DenseRoute)
        ref_info = layer.routing_info()
    assert torch.equal(y, y_ref)
    _same_info(fast_info, ref_info)


@pytest.mark.parametrize("name", ["softmax", "deepseek_v3", "qwen2_moe"])
def test_grad_mode_takes_general_path_with_the_same_forward(name):
    """Forward and backward: with autograd on, the layer runs the general path (never the inference path),
    and its output equals the inference path's; its gradients reach the router and the experts."""
    layer = _layer(name)
    x = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y_fast = layer(x)
    assert isinstance(layer._info, _DenseRoute)
    fast_info = layer.routing_info()
    x_grad = x.clone().requires_grad_()
    y = layer(x_grad)
    assert not isinstance(layer._info, _DenseRoute)
    torch.testing.assert_close(y.detach(), y_fast, rtol=0, atol=1e-6)  # in-place vs out-of-place activation
    assert torch.equal(layer.routing_info().route.expert_idx_N, fast_info.route.expert_idx_N)
    y.square().sum().backward()
    assert x_grad.grad is not None and torch.isfinite(x_grad.grad).all()
    assert layer.router.weight.grad is not None and layer.router.weight.grad.abs().sum() > 0
    layer.train()
    with torch.no_grad():  # training mode (jitter, capacity, dropout apply there): the general path
        layer(x)
    assert not isinstance(layer._info, _DenseRoute)


def test_other_calls_take_general_path():
    layer = _layer("softmax")
    x = torch.randn(2, 4, 32)
    hooked = []
    with torch.no_grad():
        layer(x, padding_mask=torch.ones(2, 4, dtype=torch.bool))
        assert not isinstance(layer._info, _DenseRoute)
        handle = layer.router.register_forward_hook(lambda _m, _a, route: hooked.append(route))
        layer(x)  # a router hook (the HF wrapper's router-logit recording) sees its RouterOutput
        handle.remove()
        assert hooked and not isinstance(layer._info, _DenseRoute)
        layer.router.expert_mask_E = torch.tensor([-1, 0, 0, 0, 0, 0, 0, 0], dtype=torch.int8)
        layer(x)
        assert not isinstance(layer._info, _DenseRoute)
        assert not (layer.routing_info().route.expert_idx_N == 0).any()
        layer.router.expert_mask_E = None
        layer(x)
        assert isinstance(layer._info, _DenseRoute)


def test_trace_sees_the_inference_path_routing():
    """moekit's tracer (a forward hook reading routing_info()) records the same routing either way."""
    from moekit.analysis.trace import TraceRecorder

    layer = _layer("deepseek_v3")
    x = torch.randn(2, 6, 32)
    traces, ran = [], []
    inference_forward = layer._inference_forward
    layer._inference_forward = lambda x_TD: ran.append(x_TD.shape) or inference_forward(x_TD)
    for general in (False, True):
        with torch.no_grad(), TraceRecorder(layer, gate_lookahead=0) as rec:
            if general:
                with reference_path():
                    layer(x)
                assert len(ran) == 1
            else:
                layer(x)
                assert ran  # the inference path ran (the tracer's hook has built the RoutingInfo since)
            traces.append(rec.to_trace())
    assert len(traces[0].seqs) == len(traces[1].seqs) == 2
    for a, b, wa, wb in zip(traces[0].seqs, traces[1].seqs, traces[0].weights, traces[1].weights, strict=True):
        assert (a == b).all() and (wa == wb).all()


def test_selection_bias_changed_after_a_zero_read_is_used():
    """The selection bias steers the inference path's choice after any change: an in-place update (update_bias,
    load_state_dict) or a new buffer after a call that saw zeros (no memo of an all-zero bias may go stale)."""
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(d_model=32, num_experts=8, d_expert=16, router=RouterConfig(kind="topk", k=2))).eval()
    x = torch.randn(6, 32, generator=torch.Generator().manual_seed(4))
    steer_E = torch.zeros(8)
    steer_E[5] = 10.0  # expert 5 wins every token's selection

    def chosen():
        with torch.no_grad():
            layer(x)
        assert isinstance(layer._info, _DenseRoute)
        return layer.routing_info().route.expert_idx_N.view(6, 2)

    assert not (chosen() == 5).any(dim=1).all()  # zeros: the scores alone decide (expert 5 is not everyone's)
    with torch.no_grad():
        layer.router.e_score_correction_bias.add_(steer_E)  # in place (as update_bias)
    assert (chosen() == 5).any(dim=1).all()
    layer.load_state_dict({**layer.state_dict(), "router.e_score_correction_bias": torch.zeros(8)})
    before = chosen()
    assert not (before == 5).any(dim=1).all()
    layer.router.e_score_correction_bias = steer_E.clone()  # a new buffer
    assert (chosen() == 5).any(dim=1).all()
    with reference_path(), torch.no_grad():
        y_ref = layer(x)
    with torch.no_grad():
        assert torch.equal(layer(x), y_ref)


def _deepcopied(layer):
    import copy

    return copy.deepcopy(layer)


def _saved_and_loaded(layer):
    import io

    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def _write_data_copy(layer, bias_E):
    layer.router.e_score_correction_bias.data.copy_(bias_E)  # `.data` has its own version counter
    return layer


def _write_data_assign(layer, bias_E):
    layer.router.e_score_correction_bias.data = bias_E.clone()  # same tensor, new storage, no version bump
    return layer


def _write_numpy_view(layer, bias_E):
    layer.router.e_score_correction_bias.numpy()[:] = bias_E.numpy()  # numpy writes bump no version either
    return layer


def _write_then(copier):
    def write(layer, bias_E):
        with torch.no_grad():
            layer.router.e_score_correction_bias.add_(bias_E)  # version 1 -> 2 (a training step's update_bias)
        return copier(layer)  # the copy's buffer restarts at version 1 with the new values
    return write


@pytest.mark.parametrize("write", [_write_data_copy, _write_data_assign, _write_numpy_view,
                                   _write_then(_deepcopied), _write_then(_saved_and_loaded)],
                         ids=["data-copy", "data-assign", "numpy-view", "deepcopy", "torch-save-load"])
def test_selection_bias_written_behind_the_version_counter_is_used(write):
    """Ways of changing the selection bias that keep the tensor and leave its `_version` where an earlier
    call saw zeros (writes through `.data` or numpy, a deepcopy or torch.save of the whole module after an
    update): the inference path still adds the bias, with the general path's output and choice."""
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(d_model=32, num_experts=8, d_expert=16, router=RouterConfig(kind="topk", k=2))).eval()
    x = torch.randn(6, 32, generator=torch.Generator().manual_seed(4))
    steer_E = torch.zeros(8)
    steer_E[5] = 10.0  # expert 5 wins every token's selection
    with torch.no_grad():
        layer.router.e_score_correction_bias.mul_(1.0)  # version 1 (as after load_state_dict)
        layer(x)  # the inference path sees zeros at version 1
        assert isinstance(layer._info, _DenseRoute)
        assert not (layer.routing_info().route.expert_idx_N.view(6, 2) == 5).any(dim=1).all()
    layer = write(layer, steer_E)
    with torch.no_grad():
        y = layer(x)
        assert isinstance(layer._info, _DenseRoute)
        chosen_TK = layer.routing_info().route.expert_idx_N.view(6, 2)
        with reference_path():
            y_ref = layer(x)
    assert (chosen_TK == 5).any(dim=1).all()
    assert torch.equal(y, y_ref)


def test_a_fake_tensor_forward_leaves_no_fake_expert_ids_behind():
    """The inference path keeps arange(E) per (E, device): one made under FakeTensorMode (shape analysis,
    memory estimates; such a forward may fail later, in the grouped GEMM's fake kernel) is a FakeTensor and
    must not be kept, or every real forward after it fails."""
    import contextlib

    from torch._subclasses.fake_tensor import FakeTensorMode

    from moekit.layers.moe import _expert_ids, _kept_expert_ids

    _kept_expert_ids.cache_clear()
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(d_model=32, num_experts=7, d_expert=16, router=RouterConfig(kind="topk", k=2))).eval()
    with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():
        assert type(_expert_ids(7, torch.zeros(3, dtype=torch.long))) is not torch.Tensor
        with contextlib.suppress(Exception):
            layer(torch.randn(6, 32))
    assert type(_expert_ids(7, torch.zeros(3, dtype=torch.long))) is torch.Tensor
    x = torch.randn(6, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        y = layer(x)
        assert isinstance(layer._info, _DenseRoute)
        with reference_path():
            assert torch.equal(y, layer(x))
