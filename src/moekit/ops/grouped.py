"""Grouped GEMM facade: y_NO = x_NI @ w_EOI[e].T for the rows of each expert e.

Legend: N assignments (rows, grouped by expert), E experts, I input width, O output width.
`offsets_E` are int32 end offsets (cumsum of counts), as `torch._grouped_mm` wants them.

One autograd Function, so that backward layouts, dtypes and the no-kernel fallback are ours:
  forward   y = grouped(x, w^T)
  backward  dx = grouped(dy, w)            dw[e] = dy_e^T @ x_e
The kernel is `torch._grouped_mm` (CPU and CUDA in torch 2.13); float64 (tests) and builds
without it use a per-expert loop of the same math.
"""

from __future__ import annotations

import functools
import warnings

import torch

_LOW_PRECISION = (torch.bfloat16, torch.float16)


def grouped_mm_available() -> bool:
    return hasattr(torch, "_grouped_mm")


@functools.cache
def cpu_has_native_low_precision() -> bool:
    """True if this CPU has bf16 dot-product instructions (AVX512-BF16 or AMX)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def compute_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype the expert GEMMs run in.

    NOTE: on CPUs without bf16 instructions (AVX2 machines such as this project's CI), oneDNN
    emulates bf16 GEMMs 7-30x slower than fp32 and some layouts take seconds (measured: 8192x512
    @ 512x2048 bf16 = 1.1 s best layout, 33 s worst, fp32 = 0.15 s). There we compute bf16/fp16
    operands in fp32 and round the result, which is also what a native bf16 GEMM with fp32
    accumulation returns up to rounding.
    """
    if device.type == "cpu" and dtype in _LOW_PRECISION and not cpu_has_native_low_precision():
        return torch.float32
    return dtype


def _loop_mm(x_NI: torch.Tensor, w_EIO: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """out[rows of e] = x[rows of e] @ w_EIO[e]; the plain per-expert form of the kernel."""
    out = x_NI.new_empty(x_NI.shape[0], w_EIO.shape[2])
    start = 0
    for e, end in enumerate(offsets_E.tolist()):
        if end > start:
            torch.mm(x_NI[start:end], w_EIO[e], out=out[start:end])
        start = end
    return out


def _use_kernel(x_NI: torch.Tensor, offsets_E: torch.Tensor) -> bool:
    if x_NI.dtype not in (torch.float32, *_LOW_PRECISION) or not grouped_mm_available():
        return False
    if x_NI.device.type == "cpu":
        # NOTE: the CPU kernel runs one mm per group, empty groups included (~12 us each), so
        # with few rows per expert (decoding: T*k rows over E experts) the loop over non-empty
        # groups is faster; with many rows both run the same mm calls. A shape test: no sync.
        return x_NI.shape[0] >= 4 * offsets_E.numel()
    return True


def _mm(x_NI: torch.Tensor, w_EIO: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    if _use_kernel(x_NI, offsets_E):
        return torch._grouped_mm(x_NI, w_EIO, offs=offsets_E)
    return _loop_mm(x_NI, w_EIO, offsets_E)


def _weight_grad(dy_NO: torch.Tensor, x_NI: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """dw[e] = dy_e^T @ x_e, (E, O, I)."""
    E = offsets_E.numel()
    aligned = (dy_NO.shape[1] * dy_NO.element_size()) % 16 == 0 and (x_NI.shape[1] * x_NI.element_size()) % 16 == 0
    if aligned and _use_kernel(dy_NO, offsets_E):
        return torch._grouped_mm(dy_NO.t(), x_NI, offs=offsets_E)
    dw = dy_NO.new_zeros(E, dy_NO.shape[1], x_NI.shape[1])
    start = 0
    for e, end in enumerate(offsets_E.tolist()):
        if end > start:
            torch.mm(dy_NO[start:end].t(), x_NI[start:end], out=dw[e])
        start = end
    return dw


class _GroupedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_NI, w_EOI, offsets_E):
        ctx.save_for_backward(x_NI, w_EOI, offsets_E)
        return _mm(x_NI, w_EOI.transpose(-2, -1), offsets_E)

    @staticmethod
    def backward(ctx, dy_NO):
        x_NI, w_EOI, offsets_E = ctx.saved_tensors
        # NOTE: the CPU kernel rejects non-contiguous gradients (e.g. from chunk/expand).
        dy_NO = dy_NO.contiguous()
        dx = _mm(dy_NO, w_EOI, offsets_E) if ctx.needs_input_grad[0] else None
        dw = _weight_grad(dy_NO, x_NI, offsets_E) if ctx.needs_input_grad[1] else None
        return dx, dw, None


def grouped_linear(x_NI: torch.Tensor, w_EOI: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """Per-expert `F.linear` over rows grouped by expert. Differentiable in x and w.

    x_NI rows must be sorted by expert; offsets_E are int32 cumulative row counts.
    Low-precision inputs on CPUs without bf16 instructions: see `compute_dtype`.
    """
    if offsets_E.dtype != torch.int32:
        offsets_E = offsets_E.to(torch.int32)
    x_NI = x_NI.contiguous()
    out_dtype = x_NI.dtype
    cdt = compute_dtype(out_dtype, x_NI.device)
    if cdt == out_dtype:
        return _GroupedLinear.apply(x_NI, w_EOI, offsets_E)
    counts_E = torch.diff(offsets_E, prepend=offsets_E.new_zeros(1))
    active_A = counts_E.nonzero().squeeze(1)
    if x_NI.shape[0] <= 16 * active_A.numel():
        # Few rows per expert (decoding, small batches): native low precision reads half the bytes
        # and converts no weights. Measured (AVX2, D=512, F=1024, E=8, bf16 layer forward):
        # 4 rows/expert 6.1 ms native vs 16.5 ms upcast; 16 rows 22 vs 25; 32 rows 27 vs 31 (even).
        return _GroupedLinear.apply(x_NI, w_EOI, offsets_E)
    if active_A.numel() < w_EOI.shape[0]:
        # Convert only the experts that have rows (autograd scatters their gradients back).
        w_EOI, offsets_E = w_EOI.index_select(0, active_A), offsets_E[active_A]
    return _GroupedLinear.apply(x_NI.to(cdt), w_EOI.to(cdt), offsets_E).to(out_dtype)


@functools.cache
def warn_missing_kernel() -> None:
    warnings.warn(
        "moekit: torch._grouped_mm is not available in this torch build; expert GEMMs fall back to a "
        "per-expert loop (slower). Install torch>=2.9 for the grouped kernel.",
        stacklevel=3,
    )
