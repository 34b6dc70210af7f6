"""The grouped GEMM against a per-expert loop, forward and backward."""

import pytest
import torch

from moekit.ops import grouped
from moekit.ops.grouped import grouped_linear


def loop_linear(x_NI, w_EOI, counts):
    outs, start = [], 0
    for e, c in enumerate(counts):
        outs.append(x_NI[start:start + c] @ w_EOI[e].T)
        start += c
    return torch.cat(outs) if outs else x_NI.new_zeros(0, w_EOI.shape[1])


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("counts", [[3, 0, 7, 2], [0, 0, 0, 5], [1], [4, 4, 4, 4, 4, 4, 4, 4], [0, 0]])
def test_grouped_linear_matches_loop(dtype, tol, counts):
    E, O, I = len(counts), 12, 8
    x = torch.randn(sum(counts), I, dtype=dtype, requires_grad=True)
    w = torch.randn(E, O, I, dtype=dtype, requires_grad=True)
    offs = torch.cumsum(torch.tensor(counts), 0).to(torch.int32)
    y = grouped_linear(x, w, offs)
    y_ref = loop_linear(x, w, counts)
    torch.testing.assert_close(y, y_ref, atol=tol, rtol=tol)
    g = torch.randn_like(y)
    if y.numel():
        dx, dw = torch.autograd.grad(y, (x, w), g)
        dx_ref, dw_ref = torch.autograd.grad(y_ref, (x, w), g)
        torch.testing.assert_close(dx, dx_ref, atol=tol, rtol=tol)
        torch.testing.assert_close(dw, dw_ref, atol=tol, rtol=tol)


def test_grouped_linear_gradcheck_float64():
    counts = [2, 0, 3]
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 6, 4, dtype=torch.float64, requires_grad=True)
    offs = torch.cumsum(torch.tensor(counts), 0).to(torch.int32)
    assert torch.autograd.gradcheck(lambda a, b: grouped_linear(a, b, offs), (x, w))


def test_kernel_path_fp32_aligned_matches_loop():
    """Widths that are multiples of 16 bytes take torch._grouped_mm for the weight gradient too."""
    counts = [5, 0, 9, 2]
    x = torch.randn(16, 32, requires_grad=True)
    w = torch.randn(4, 64, 32, requires_grad=True)
    offs = torch.cumsum(torch.tensor(counts), 0).to(torch.int32)
    y = grouped_linear(x, w, offs)
    (y * torch.randn_like(y)).sum().backward()
    x2, w2 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    torch.manual_seed(0)
    y2 = loop_linear(x2, w2, counts)
    torch.testing.assert_close(y.double(), y2, atol=1e-4, rtol=1e-4)


def test_low_precision_runs_in_compute_dtype_and_returns_input_dtype():
    counts = [3, 5]
    x = torch.randn(8, 16, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(2, 32, 16, dtype=torch.bfloat16, requires_grad=True)
    offs = torch.cumsum(torch.tensor(counts), 0).to(torch.int32)
    y = grouped_linear(x, w, offs)
    assert y.dtype == torch.bfloat16
    y_ref = loop_linear(x.float(), w.float(), counts)
    torch.testing.assert_close(y.float(), y_ref, atol=0.1, rtol=0.02)
    y.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.bfloat16


def test_compute_dtype_policy():
    cpu = torch.device("cpu")
    assert grouped.compute_dtype(torch.float32, cpu) == torch.float32
    expected = torch.bfloat16 if grouped.cpu_has_native_low_precision() else torch.float32
    assert grouped.compute_dtype(torch.bfloat16, cpu) == expected


@pytest.mark.parametrize("counts", [[40, 0, 30, 0], [64, 64]])  # many rows per expert: fp32 compute path
def test_low_precision_upcast_path_with_inactive_experts(counts):
    E = len(counts)
    x = torch.randn(sum(counts), 16, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(E, 32, 16, dtype=torch.bfloat16, requires_grad=True)
    offs = torch.cumsum(torch.tensor(counts), 0).to(torch.int32)
    y = grouped_linear(x, w, offs)
    x32, w32 = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    y_ref = loop_linear(x32, w32, counts)
    torch.testing.assert_close(y.float(), y_ref, atol=0.1, rtol=0.02)
    g = torch.randn_like(y_ref)
    (y.float() * g).sum().backward()
    (y_ref * g).sum().backward()
    torch.testing.assert_close(x.grad.float(), x32.grad, atol=0.2, rtol=0.02)
    torch.testing.assert_close(w.grad.float(), w32.grad, atol=0.5, rtol=0.02)
    for e, c in enumerate(counts):
        if c == 0:
            assert not w.grad[e].any()  # experts without rows get exactly zero gradient
