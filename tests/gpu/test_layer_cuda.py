"""MoELayer on CUDA against the same layer on CPU (fp32), forward and backward, for every registered
router and every grouped-GEMM path (forced, and asserted to have run); bf16 on CUDA within bf16 tolerance.

Excluded from the default suite (marker `gpu`); run with `pytest tests/gpu -m gpu` on a CUDA machine
(scripts/gpu_check.sh). MOEKIT_GPU_TEST_DEVICE=cpu runs the same checks CPU-against-CPU (a dry run of
the test code on a machine without a GPU; it proves nothing about CUDA).
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

import moekit
from moekit.ops import grouped

DEVICE = os.environ.get("MOEKIT_GPU_TEST_DEVICE", "cuda")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(),
                                                  reason="needs a CUDA device (torch.cuda.is_available() is False)")]
# fp32 CUDA vs CPU: same math, different reduction order (and no TF32: conftest.py): ~1e-6 observed
# on layers this size; 1e-4 leaves room for accumulation order, not for a wrong expert or weight.
FP32_TOL = dict(atol=1e-4, rtol=1e-4)
# Routers that draw random numbers in training (Gumbel sampling): run in eval mode, where they are
# deterministic, since the CPU and CUDA generators draw different numbers.
SAMPLING_IN_TRAINING = {"sparsemixer", "random"}


def _layer(kind: str, **kw) -> moekit.MoELayer:
    torch.manual_seed(0)
    cfg = moekit.MoEConfig(d_model=64, d_expert=128, num_experts=8, router=moekit.RouterConfig(kind=kind, **kw))
    layer = moekit.MoELayer(cfg)
    null_weight = getattr(layer.router, "null_weight", None)
    if null_weight is not None:
        # AdaMoE's null rows start as exact copies of real rows: a real expert and its null twin tie exactly,
        # and torch.topk breaks exact ties differently on CPU and CUDA (as in the authors' CUDA code). Part
        # them, as one training step would, so the comparison is about moekit, not the tie-break.
        with torch.no_grad():
            null_weight.add_(0.01 * torch.randn(null_weight.shape, generator=torch.Generator().manual_seed(5)))
    return layer.eval() if kind in SAMPLING_IN_TRAINING else layer.train()


def _state(layer: moekit.MoELayer, device, B: int, T: int):
    """The router state a model hands the layer: token ids (hash), the shared GRU (recurrent), else None."""
    router = layer.cfg.router
    if router.routes_on_token_ids():
        return torch.randint(0, 100, (B, T), generator=torch.Generator().manual_seed(3)).to(device)
    torch.manual_seed(1)
    shared = router.build_shared_module()
    return router.initial_state(None if shared is None else shared.to(device))


def _run(layer, x, state, g):
    """Forward and backward; returns (y, x.grad, {param name: grad}, executed (token, expert) pairs)."""
    x = x.detach().clone().requires_grad_()
    y = layer(x, router_state=state)
    (y * g).sum().backward()
    ex = layer.routing_info().executed
    # The executed (token, expert) pairs as a sorted set: CPU and CUDA sorts may order equal keys otherwise.
    pairs = (ex.token_idx_N.cpu() * layer.cfg.num_experts + ex.expert_idx_N.cpu()).sort().values
    grads = {n: p.grad.detach().cpu() for n, p in layer.named_parameters() if p.grad is not None}
    return y.detach().cpu(), x.grad.cpu(), grads, pairs


def _compare(kind, cpu_layer, dev_layer, path=None, B=2, T=24):
    x = torch.randn(B, T, 64, generator=torch.Generator().manual_seed(2))
    g = torch.randn(B, T, 64, generator=torch.Generator().manual_seed(4))
    ref = _run(cpu_layer, x, _state(cpu_layer, "cpu", B, T), g)
    if path is None:
        with grouped.record() as ran:
            out = _run(dev_layer, x.to(DEVICE), _state(dev_layer, DEVICE, B, T), g.to(DEVICE))
    else:
        with grouped.force(path) as ran:
            out = _run(dev_layer, x.to(DEVICE), _state(dev_layer, DEVICE, B, T), g.to(DEVICE))
    assert torch.equal(out[3], ref[3]), f"{kind}: CUDA executed other (token, expert) assignments than CPU"
    torch.testing.assert_close(out[0], ref[0], **FP32_TOL, msg=lambda m: f"{kind} forward: {m}")
    torch.testing.assert_close(out[1], ref[1], **FP32_TOL, msg=lambda m: f"{kind} dx: {m}")
    assert out[2].keys() == ref[2].keys()
    for n in ref[2]:
        torch.testing.assert_close(out[2][n], ref[2][n], **FP32_TOL, msg=lambda m, n=n: f"{kind} grad {n}: {m}")
    return ran


@pytest.mark.parametrize("kind", moekit.registered_routers())
def test_every_router_on_cuda_equals_cpu_forward_and_backward_fp32(kind):
    cpu_layer = _layer(kind)
    dev_layer = copy.deepcopy(cpu_layer).to(DEVICE)
    ran = _compare(kind, cpu_layer, dev_layer)
    # The automatic choice on CUDA is the kernel for every fp32 GEMM of these aligned widths (64, 128):
    # forward, dx and dw of the up and down projections; no loop, no masked GEMM.
    paths = {path for (_, path), n in ran.items() if n}
    want = {"kernel"} if DEVICE == "cuda" else paths
    assert paths == want, f"{kind}: grouped GEMM paths that ran on {DEVICE}: {dict(ran)}"
    assert {stage for (stage, _), n in ran.items() if n} == set(grouped.STAGES), dict(ran)


@pytest.mark.parametrize("path", grouped.PATHS)
@pytest.mark.parametrize("kind", ["topk", "topp", "expert_choice"])
def test_each_grouped_path_forced_on_cuda_equals_cpu(kind, path):
    cpu_layer = _layer(kind)
    dev_layer = copy.deepcopy(cpu_layer).to(DEVICE)
    if path in ("loop_wx", "loop_numpy") and DEVICE != "cpu":  # CPU paths (MKL's GEMM orientations, numpy): refused
        with pytest.raises(RuntimeError, match=f"{path}.*operands on"):
            _compare(kind, cpu_layer, dev_layer, path=path)
        return
    ran = _compare(kind, cpu_layer, dev_layer, path=path)
    # Two expert GEMMs (gate_up, down) per stage, each on the forced path ("loop_wx" and "loop_numpy" are forward
    # paths: their dx and dw run the loop).
    assert ran == {(stage, "loop" if path in ("loop_wx", "loop_numpy") and stage != "forward" else path): 2
                   for stage in grouped.STAGES}, dict(ran)


def test_kernel_refuses_unaligned_width_on_cuda_and_the_loop_matches_cpu():
    """F = 37 (148-byte fp32 rows): the kernel cannot take it; the automatic choice runs the loop (with
    moekit's one-line warning off CPU) and still equals CPU."""
    torch.manual_seed(0)
    cfg = moekit.MoEConfig(d_model=64, d_expert=37, num_experts=8, router=moekit.RouterConfig(kind="topk"))
    cpu_layer = moekit.MoELayer(cfg).train()
    dev_layer = copy.deepcopy(cpu_layer).to(DEVICE)
    grouped._warn_loop_fallback.cache_clear()  # warns once per reason and process
    with pytest.warns(UserWarning, match="per-expert loop") if DEVICE == "cuda" else _nothing():
        ran = _compare("topk F=37", cpu_layer, dev_layer)
    assert ran["forward", "loop"] >= 1, dict(ran)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("kind", ["topk", "topp"])
def test_bf16_on_cuda_within_bf16_tolerance_of_fp32_cpu(kind):
    """bf16 weights and activations on CUDA (the native bf16 kernel) against the fp32 CPU layer with the
    same weights: within bf16 rounding (8 mantissa bits: 2**-8 relative per op, a few ops deep)."""
    cpu_layer = _layer(kind).eval()
    dev_layer = copy.deepcopy(cpu_layer).to(DEVICE, torch.bfloat16)
    x = torch.randn(2, 24, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = cpu_layer(x)
        with grouped.record() as ran:
            y = dev_layer(x.to(DEVICE, torch.bfloat16))
    assert y.dtype == torch.bfloat16 and y.device.type == torch.device(DEVICE).type
    if DEVICE == "cuda":
        assert {p for (_, p), n in ran.items() if n} == {"kernel"}, dict(ran)
    # Assignments near a routing boundary may flip under bf16 logits; compare tokens whose executed experts agree.
    err = (y.float().cpu() - ref).abs()
    scale = ref.abs().max()
    assert float(err.median()) < 2e-2 * float(scale), (float(err.median()), float(scale))
    assert float((err < 5e-2 * scale).float().mean()) > 0.9, "more than 10% of outputs off by > 5% of max |y|"


def test_inference_path_first_run_in_a_cuda_graph_capture_leaves_eager_calls_right():
    """The inference path keeps arange(E) per device for its offsets: one first made while a CUDA graph
    captures is only recorded there (no ids in its memory until a replay), so it must not be kept for eager
    calls. Captured first, then an eager call before any replay equals the general path; the replay too."""
    if DEVICE != "cuda":
        pytest.skip("CUDA graphs need a CUDA device")
    from moekit.layers.moe import _DenseRoute, _kept_expert_ids, reference_path

    layer = moekit.MoELayer(moekit.MoEConfig(d_model=64, d_expert=128, num_experts=24,
                                             router=moekit.RouterConfig(kind="topk", k=2)))
    layer = layer.to("cuda", torch.bfloat16).eval()  # bf16: the grouped GEMM reads no row count (fp32 does)
    x_static = torch.randn(16, 64, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(16, 64, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up (lazy kernel state), as torch.cuda.graph asks
            for _ in range(2):
                with reference_path():
                    layer(x_static)
        torch.cuda.current_stream().wait_stream(side)
        _kept_expert_ids.cache_clear()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y_static = layer(x_static)
        y = layer(x)  # eager, before any replay
        assert isinstance(layer._info, _DenseRoute)
        with reference_path():
            y_ref, y_static_ref = layer(x), layer(x_static)
        graph.replay()
    # (same kernels, same bf16 inputs: any gap is a wrong expert's rows, far beyond this)
    torch.testing.assert_close(y, y_ref, atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(y_static, y_static_ref, atol=1e-2, rtol=1e-2)
