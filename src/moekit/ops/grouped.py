"""Grouped GEMM facade: y_NO = x_NI @ w_EOI[e].T for the rows of each expert e.

Legend: N assignments (rows, grouped by expert), E experts, I input width, O output width, A experts
with rows (active).
`offsets_E` are int32 end offsets (cumsum of counts), as `torch._grouped_mm` wants them.

One autograd Function, so that backward layouts, dtypes and the no-kernel fallback are ours:
  forward   y = grouped(x, w^T)
  backward  dx = grouped(dy, w)            dw[e] = dy_e^T @ x_e
Each of the three GEMMs runs either the kernel, `torch._grouped_mm` (CPU and CUDA in torch 2.13),
or a per-expert loop of the same math. The choice is made per GEMM from dtypes, shapes, strides
and data pointers only (never from the counts, so no host sync): float64 (tests), builds without
the kernel and operands the kernel cannot take (`kernel_refusal`: a row that is not a multiple of
16 bytes, e.g. an expert width F = 37) run the loop. On CPU a forward GEMM over few rows per expert
whose weight is stored (O, I) runs "loop_wx", the loop with the weight as the left operand
(`CPU_WX_ROWS_PER_EXPERT`): MKL streams the weight about twice as fast that way (decoding). One whose weight
is stored (I, O) runs "loop_numpy" on AMD CPUs where numpy's OpenBLAS runs one thread (`CPU_NUMPY_BLAS`): the
loop with each expert's GEMM in numpy's OpenBLAS, which streams such a weight 1.3-1.5x faster than torch's MKL there.

Under tracing (`torch.compile`, `torch.export`) the choice reads no data pointer and no row count (a
guard on a dynamic shape): a bfloat16 GEMM the kernel can take runs the kernel (torch 2.13 traces the
kernel for bfloat16 only), and any other runs "masked",
a per-expert GEMM over every row that keeps the rows of that expert (E times the FLOPs, but traceable,
with no data-dependent slice). Neither path syncs with the host.

Tests choose the path with `force("kernel" | "loop" | "loop_wx" | "loop_numpy" | "masked")` and read which one ran
with `record()` (nothing is recorded while tracing: a traced graph runs many times).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import warnings
from collections.abc import Iterator

import numpy as np
import threadpoolctl
import torch

_LOW_PRECISION = (torch.bfloat16, torch.float16)
_KERNEL_DTYPES = (torch.float32, *_LOW_PRECISION)
PATHS = ("kernel", "loop", "loop_wx", "loop_numpy", "masked")
STAGES = ("forward", "dx", "dw")

_forced: str | None = None
# CPU: the kernel runs a GEMM over `rows` assignments when rows * this >= E (see `_use_kernel`). Measured
# with moekit.bench.timing (round-robin, thread CPU time, one thread, 2-vCPU AVX2 EPYC), both GEMMs of
# an expert FFN, kernel / loop time: D=256 F=512 E=16 (the benchmarks/hf.py shape) 0.91-0.96 at 4..256
# rows (decode and prefill alike); E=64: 1.11 at 4 rows, 0.99 at 8, 0.95 at 16; E=128: 1.67 at 4, 1.23
# at 8, 1.06 at 16, 0.97 at 32. D=64 F=128: E=32 1.21 at 4, 0.95 at 8; E=128 1.97 at 8, 0.99 at 32;
# E=8 0.65-0.95 at every count. D=F=1024: E=128 1.07 at 4, 1.00 at 8, 0.97 at 16. bf16 (emulated) alike.
# The previous rule (the kernel from 4 rows per expert: 16 times as many) ran the slower loop when decoding.
CPU_KERNEL_ROWS_PER_EXPERT = 4
# CPU, no autograd: a whole expert FFN runs expert by expert (`per_expert_ffn`) when its hidden activations
# average at least this many bytes per expert. Grouped, the hidden activations of all rows (N x X) are written by
# one GEMM and then swept by every elementwise op of the activation (and of per-row biases) out of L3 or memory;
# expert by expert they stay in cache between the expert's two GEMMs, for ~15 more op calls per expert.
# Measured with moekit's banks of benchmarks/hf.py's models (thread CPU time, one thread, 2-vCPU AVX2 EPYC, E=16,
# D=256, F=512, fp32: 4 KiB of [gate; up] per row), per-expert / grouped time: < 1 row per expert (decoding)
# 1.3-1.4; 32 rows per expert 1.13-1.26; 64 rows (256 KiB) 1.05-1.09; 128 rows (512 KiB) 0.94 gpt-oss, 0.96
# Mixtral, 0.99 Qwen3-MoE; 256 rows 0.80 gpt-oss.
CPU_PER_EXPERT_BYTES = 512 * 1024
# CPU, forward, float32: a GEMM over at most CPU_WX_ROWS_PER_EXPERT rows per expert (rows <= this * E) whose weight is
# stored (O, I) row-major (the layout of Mixtral, Qwen, OLMoE, DeepSeek, Granite, ... and of moekit's banks) and
# holds at least CPU_WX_MIN_WEIGHT_BYTES per expert runs "loop_wx": per expert y_e = (W_e @ x_e^T)^T, a lone row
# paired with a neighbour (its extra column is dropped). MKL runs x_e @ W_e^T for a few rows (any single row: a GEMV)
# streaming W_e at 7-10 GB/s, and W_e @ x_e^T with 2-8 columns at 14-19 GB/s (one thread, 2-vCPU AMD EPYC, MKL
# 2024.0, weights out of cache, D=256, F=512, 96 experts). Weights stored (I, O) (gpt-oss, Llama 4) are left alone:
# there the flip is 5-20x slower. Whole greedy decodes of benchmarks/hf.py's models (E=16, 4 layers, batch 4, thread
# CPU time, transformers' grouped_mm / moekit): D=256, F=512 1.28-1.45x faster at 4-32 sequences (0.5-4 rows per
# expert); at 8 rows per expert within noise and at 16 a loss (0.83), hence the row rule. Small experts lose: the
# loop's ~10 us of Python and op calls per expert outweigh the bandwidth saved on weights that stay in cache
# (D=64, F=128-256 (32-128 KiB per expert): 0.89; D=96, F=384 (147-294 KiB): 0.96-0.98; D=128, F=256
# (128-256 KiB): 1.04-1.06), hence the size floor, under which the kernel or the plain loop run.
CPU_WX_ROWS_PER_EXPERT = 4
CPU_WX_MIN_WEIGHT_BYTES = 512 * 1024
# CPU, forward, float32: the GEMMs the rule above leaves alone because their weight is stored (I, O) row-major (gpt-oss,
# Llama 4), over as few rows and weights as large, run "loop_numpy" where CPU_NUMPY_BLAS holds: per expert x_e @ W_e
# in numpy's OpenBLAS (np.matmul). On AMD CPUs MKL does not take its AVX-512 code; OpenBLAS (its SkylakeX kernels)
# streams the weight 1.3-1.5x faster: one row, weights out of cache, one thread, 2-vCPU AMD EPYC with AVX-512, MKL
# 2024.0 / OpenBLAS 0.3.31: (256, 1024) 17 -> 23 GB/s, (512, 256) 8 -> 12 GB/s; 2-4 rows (512, 256) 2-3x. Whole greedy
# decodes of benchmarks/hf.py's gpt-oss (E=16, D=256, F=512, thread CPU time, against the kernel): 1.04-1.07x faster at
# 1-16 sequences, 1.01 at 32 (4 rows per expert). Only while numpy's OpenBLAS runs one thread (OPENBLAS_NUM_THREADS or
# OMP_NUM_THREADS=1, or threadpoolctl.threadpool_limits): its own thread pool next to torch's OpenMP threads
# oversubscribed the 2 cores (a whole decode 0.81x, wall clock); with one OpenBLAS thread and two torch threads 1.07x.
# Not on Intel CPUs (MKL's own ground), nor on AMD CPUs without AVX-512 (not measured), nor where torch's BLAS is
# not MKL (the same BLAS in a Python loop). DBRX's flat down projection, (E, F, D) row-major, qualifies too.
CPU_NUMPY_BLAS = "AMD CPU with AVX-512, torch's BLAS MKL, numpy's BLAS OpenBLAS running one thread"
_recorders: list[collections.Counter] = []


def grouped_mm_available() -> bool:
    return hasattr(torch, "_grouped_mm")


@functools.cache
def _cpuinfo() -> str:
    """/proc/cpuinfo's text ("" where there is none: not Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return ""


@functools.cache
def cpu_has_native_low_precision() -> bool:
    """True if this CPU has bf16 dot-product instructions (AVX512-BF16 or AMX)."""
    flags = _cpuinfo()
    return "avx512_bf16" in flags or "amx_bf16" in flags


@functools.cache
def _numpy_openblas_pools() -> tuple | None:
    """threadpoolctl's controllers of numpy's OpenBLAS (the loaded OpenBLAS libraries of the version numpy was built
    with) where the rest of CPU_NUMPY_BLAS holds (an AMD CPU with AVX-512, torch's BLAS is MKL, numpy's is OpenBLAS),
    else None. Read once: the CPU and the libraries numpy and torch link do not change in a process; the thread count
    does, and `numpy_blas_streams_faster` reads it at each call."""
    flags = _cpuinfo()
    if "AuthenticAMD" not in flags or "avx512f" not in flags or not _torch_blas_is_mkl():
        return None  # measured on an AVX-512 EPYC only: MKL's AVX2 code on AVX2-only AMD CPUs is not measured
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        name, version = str(blas["name"]).lower(), str(blas["version"])
    except (KeyError, TypeError):  # a numpy too old to say
        return None
    pools = tuple(pool for pool in threadpoolctl.ThreadpoolController().select(internal_api="openblas").lib_controllers
                  if pool.version == version)  # numpy's own copy, not another package's OpenBLAS
    return pools if "openblas" in name and pools else None


def _torch_blas_is_mkl() -> bool:
    """torch's GEMMs call MKL: its build's BLAS_INFO (`torch.__config__.show()`). `torch.backends.mkl.is_available()`
    says only that torch was built with MKL (found for its FFTs and sparse routines whatever BLAS it was given)."""
    return torch.backends.mkl.is_available() and "BLAS_INFO=mkl" in torch.__config__.show()


def numpy_blas_streams_faster() -> bool:
    """Whether CPU_NUMPY_BLAS holds now (numpy's OpenBLAS runs one thread on an AMD AVX-512 CPU next to torch's
    MKL): the machine part of the "loop_numpy" rule. ~0.5 us (one thread-count read per OpenBLAS library)."""
    pools = _numpy_openblas_pools()
    return pools is not None and all(pool.num_threads == 1 for pool in pools)


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


def kernel_refusal(a: torch.Tensor, b: torch.Tensor, check_pointers: bool = True) -> str | None:
    """Why `torch._grouped_mm(a, b, offs=...)` should not run these operands, or None when it can.

    The kernel takes float32 / bfloat16 / float16 operands of one dtype, each with a unit stride in
    its last two dims and the other stride a multiple of 16 bytes ("strides should be multiple of 16
    bytes" otherwise: an fp32 width of 37, a bf16 width of 4). CPU builds up to torch 2.10 also need
    16-byte aligned data pointers (transformers met it with memory-mapped safetensors weights). The
    output's rows (b.shape[-1] values) must be 16-byte multiples too: CUDA pads unaligned output rows
    (a non-contiguous result) and the CPU kernel computes one-column outputs otherwise than one mm
    per expert (not bitwise the loop). Reads dtypes, shapes, strides and pointers: no host sync.
    check_pointers=False skips the pointer test (traced tensors have no data; torch 2.13 needs none).
    """
    if not grouped_mm_available():
        return "torch._grouped_mm is missing from this torch build"
    if a.dtype not in _KERNEL_DTYPES or b.dtype != a.dtype:
        return f"dtypes {a.dtype}, {b.dtype} (the kernel takes float32, bfloat16 or float16, both alike)"
    for m in (a, b):
        size, (s_row, s_col) = m.element_size(), m.stride()[-2:]
        lead = s_row if s_col == 1 else s_col if s_row == 1 else None
        if lead is None:
            return f"an operand with strides {m.stride()} (no unit stride in its last two dims)"
        if lead * size % 16 or (m.dim() == 3 and m.stride(0) * size % 16):
            return (f"a row of {lead} {str(m.dtype).removeprefix('torch.')} values ({lead * size} bytes) is not "
                    "a multiple of 16 bytes")
        if check_pointers and m.data_ptr() % 16:
            return "an operand whose data pointer is not 16-byte aligned"
    out_cols = b.shape[-1]
    if out_cols * a.element_size() % 16:
        return (f"an output row of {out_cols} {str(a.dtype).removeprefix('torch.')} values "
                f"({out_cols * a.element_size()} bytes) that is not a multiple of 16 bytes")
    return None


_refusals: dict[tuple, str | None] = {}


def _cached_refusal(a: torch.Tensor, b: torch.Tensor) -> str | None:
    """`kernel_refusal(a, b)`, remembered by everything it reads (dtypes, strides, the output width, the
    pointers' alignment): a layer meets the same few operand layouts at every call, and the checks cost
    more than the GEMM's own setup at decode sizes (2 GEMMs per MoE layer and token step)."""
    key = (grouped_mm_available(), a.dtype, b.dtype, a.stride(), b.stride(), b.shape[-1], _alignment(a),
           _alignment(b))
    refusal = _refusals.get(key, _NOT_CHECKED)
    if refusal is _NOT_CHECKED:
        if len(_refusals) > 4096:  # bounded: a process that meets many layouts keeps checking, no leak
            _refusals.clear()
        refusal = _refusals[key] = kernel_refusal(a, b, check_pointers=None not in key[-2:])
    return refusal


_NOT_CHECKED = object()


def _alignment(t: torch.Tensor) -> int | None:
    """t's data pointer modulo 16, or None for a tensor without storage: torch.func's transforms run a Function's
    backward on their wrappers (torch 2.13's kernel needs no alignment; see `kernel_refusal`)."""
    try:
        return t.data_ptr() % 16
    except RuntimeError:
        return None


def _recording_graph(*tensors: torch.Tensor) -> bool:
    """Whether autograd records ops on these tensors here: a backward run with create_graph, or under torch.func's
    transforms (their wrappers require grad). Then the loops write no `out=` tensor, which autograd refuses."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _loop_mm(x_NI: torch.Tensor, w_EIO: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """out[rows of e] = x[rows of e] @ w_EIO[e]; the plain per-expert form of the kernel."""
    if _recording_graph(x_NI, w_EIO):
        pieces, start = [], 0
        for e, end in enumerate(offsets_E.tolist()):
            if end > start:
                pieces.append(torch.mm(x_NI[start:end], w_EIO[e]))
            start = end
        return torch.cat([*pieces, x_NI.new_zeros(x_NI.shape[0] - start, w_EIO.shape[2])])
    out = x_NI.new_empty(x_NI.shape[0], w_EIO.shape[2])
    start = 0
    for e, end in enumerate(offsets_E.tolist()):
        if end > start:
            torch.mm(x_NI[start:end], w_EIO[e], out=out[start:end])
        start = end
    return out


def _loop_wx_mm(x_NI: torch.Tensor, w_EIO: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """out[rows of e] = (w_EIO[e]^T @ x[rows of e]^T)^T: the loop with the weight as the left operand (see
    CPU_WX_ROWS_PER_EXPERT and `mm_rows_wx`)."""
    out = x_NI.new_empty(x_NI.shape[0], w_EIO.shape[2])
    start = 0
    for e, end in enumerate(offsets_E.tolist()):
        if end > start:
            mm_rows_wx(x_NI, w_EIO[e].t(), start, end, out)
        start = end
    return out


def mm_rows_wx(x_NI: torch.Tensor, w_OI: torch.Tensor, start: int, end: int, out_NO: torch.Tensor) -> None:
    """out_NO[start:end] = x_NI[start:end] @ w_OI.T computed as (w_OI @ x^T)^T, the "loop_wx" form of one expert.

    x_NI (N, I), w_OI (O, I), out_NO (N, O); rows start..end (end > start). A single row is computed with a
    neighbouring row of x_NI as the GEMM's second column (rows min(start, N - 2) and the next; itself when N = 1),
    whose result is dropped: MKL would run one column as a GEMV at half the speed. Each column of a GEMM depends
    on its own input row only, so the neighbour's values never reach the result (the offload runtime, which pairs
    with the same rows of its full-size buffers, gets the resident layer's bits). MKL's rounding of W @ x^T depends
    on where w_OI starts and on its row stride, modulo 16 bytes (x @ W^T's does not): a weight that is not
    contiguous and 16-byte aligned (an odd expert of a stack with O * I % 4 != 0, a view into a wider tensor) is
    copied first, so the bits depend on the values only, never on where a copy of the weight lies."""
    if w_OI.data_ptr() % 16 or not w_OI.is_contiguous():
        w_OI = w_OI.clone(memory_format=torch.contiguous_format)  # torch allocates 64-byte aligned
    if end - start == 1:
        pair = min(start, x_NI.shape[0] - 2)
        x_2I = x_NI[pair:pair + 2] if pair >= 0 else torch.cat((x_NI, x_NI))
        out_NO[start] = torch.mm(w_OI, x_2I.t())[:, start - max(pair, 0)]
    else:
        out_NO[start:end] = torch.mm(w_OI, x_NI[start:end].t()).t()


def _loop_numpy_mm(x_NI: torch.Tensor, w_EIO: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """out[rows of e] = x[rows of e] @ w_EIO[e] in numpy's BLAS: the "loop_numpy" path (see CPU_NUMPY_BLAS)."""
    out = x_NI.new_empty(x_NI.shape[0], w_EIO.shape[2])
    w_eio = w_EIO.detach().resolve_neg().numpy()  # .numpy() refuses a negative-bit view (torch._neg_view)
    ends = offsets_E.tolist()
    starts = [0, *ends[:-1]]
    active = [e for e, (start, end) in enumerate(zip(starts, ends, strict=True)) if end > start]
    mm_rows_numpy(x_NI, [w_eio[e] for e in active], [(starts[e], ends[e]) for e in active], out)
    return out


def mm_rows_numpy(x_NI: torch.Tensor, w_by_expert: list[np.ndarray], ranges: list[tuple[int, int]],
                  out_NO: torch.Tensor) -> None:
    """out_NO[s:t] = x_NI[s:t] @ w_IO for each expert's (I, O) float32 weight and row range (s, t), each one
    `np.matmul` in numpy's BLAS over views of the tensors: the "loop_numpy" form, shared with the offload
    runtime. A row's bits depend on how many rows its GEMM has (np.matmul runs a single row as a GEMV), never on
    where the operands lie (checked at every 4-byte offset), so the offload runtime, which runs the same ranges out
    of its own buffers, gets the resident layer's bits. Operands BLAS cannot take as they lie (no unit stride)
    numpy copies first."""
    x_ni, out_no = x_NI.detach().resolve_neg().numpy(), out_NO.numpy()
    for w_IO, (s, t) in zip(w_by_expert, ranges, strict=True):
        np.matmul(x_ni[s:t], w_IO, out=out_no[s:t])


def _masked_mm(x_NI: torch.Tensor, w_EIO: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """out[rows of e] = x[rows of e] @ w_EIO[e], as one GEMM over all rows per expert, keeping that
    expert's rows: traceable (no slice by data), E times the loop's FLOPs; see the module doc."""
    expert_N = _expert_of_rows(offsets_E, x_NI.shape[0])
    out = x_NI.new_zeros(x_NI.shape[0], w_EIO.shape[2])
    for e in range(w_EIO.shape[0]):
        out = torch.where((expert_N == e).unsqueeze(1), x_NI @ w_EIO[e], out)
    return out


def _expert_of_rows(offsets_E: torch.Tensor, rows: int) -> torch.Tensor:
    """(N,) the expert of each row, from the end offsets."""
    return torch.searchsorted(offsets_E, torch.arange(rows, device=offsets_E.device, dtype=offsets_E.dtype),
                              right=True)


def per_expert_ffn(x_NI: torch.Tensor, hidden_width: int, num_experts: int) -> bool:
    """Whether an expert FFN over x_NI (N rows grouped by expert) should run expert by expert rather than as two
    grouped GEMMs (see CPU_PER_EXPERT_BYTES): on CPU, without autograd or tracing, in a dtype the GEMMs run
    natively (`compute_dtype`), with N * hidden_width values of at least CPU_PER_EXPERT_BYTES per expert; never
    while a test forces a path, nor for float32 rows few enough for "loop_wx" (CPU_WX_ROWS_PER_EXPERT). Counted by
    `record()` as ("ffn", "per_expert"). Reads shapes only."""
    if (_forced is not None or x_NI.device.type != "cpu" or torch.is_grad_enabled() or torch.compiler.is_compiling()
            or compute_dtype(x_NI.dtype, x_NI.device) != x_NI.dtype):
        return False
    if x_NI.dtype == torch.float32 and x_NI.shape[0] <= CPU_WX_ROWS_PER_EXPERT * num_experts:
        # NOTE: the grouped GEMMs may run these as "loop_wx", whose W @ x^T is not F.linear's x @ W^T bit for bit;
        # the offload runtime and the expert adapters compute as the grouped GEMMs do, so the bank must too. A hidden
        # layer wide enough for the byte rule at so few rows (2F >= 32768 at 4 rows per expert) is rare, and the
        # route measured slower at decode sizes anyway.
        return False
    if x_NI.shape[0] * hidden_width * x_NI.element_size() < CPU_PER_EXPERT_BYTES * num_experts:
        return False
    note_ran("ffn", "per_expert")
    return True


def _choose(stage: str, a: torch.Tensor, b: torch.Tensor, rows: int, num_experts: int) -> str:
    """The path ("kernel", "loop", "loop_wx", "loop_numpy" or "masked") of one GEMM `a @ b` over `rows` assignments
    (counted for `record`)."""
    if torch.compiler.is_compiling() and _forced is None:
        # NOTE: torch 2.13 traces torch._grouped_mm for bfloat16 operands only (its meta function).
        traceable = a.dtype == torch.bfloat16 and kernel_refusal(a, b, check_pointers=False) is None
        return "kernel" if traceable else "masked"
    if _forced == "masked":
        path = "masked"
    elif stage == "forward" and forward_runs_loop_wx(a, b, rows, num_experts):
        path = "loop_wx"
    elif stage == "forward" and forward_runs_loop_numpy(a, b, rows, num_experts):
        path = "loop_numpy"
    elif _forced in ("loop_wx", "loop_numpy"):  # dx and dw: the rules are measured for the forward GEMM
        path = "loop"
    else:
        path = "kernel" if _use_kernel(stage, a, b, rows, num_experts) else "loop"
    note_ran(stage, path)
    return path


def note_ran(stage: str, path: str) -> None:
    """Count one GEMM (or FFN) of `stage` on `path` in every open `record()`; the offload runtime's GEMMs, which
    choose their path with the rules here but run outside `grouped_linear`, are counted through it too."""
    for ran in _recorders:
        ran[stage, path] += 1


def forward_runs_loop_wx(a: torch.Tensor, b: torch.Tensor, rows: int, num_experts: int) -> bool:
    """Whether the forward GEMM `a @ b[e]` over `rows` rows of `num_experts` experts runs "loop_wx": when a test
    forces it (RuntimeError if `loop_wx_refusal` objects), or by the CPU rule (CPU_WX_ROWS_PER_EXPERT) when nothing
    is forced and nothing is traced. The offload runtime asks it too, to compute as the resident layer does."""
    if _forced == "loop_wx":
        refusal = loop_wx_refusal(a, b)
        if refusal is not None:
            raise RuntimeError(f"moekit.ops.grouped.force('loop_wx'): the forward GEMM cannot run it: {refusal}")
        return True
    return _streams_weights(a, b, rows, num_experts) and b.stride(-2) == 1  # each expert's weight stored (O, I)


def _streams_weights(a: torch.Tensor, b: torch.Tensor, rows: int, num_experts: int) -> bool:
    """What the automatic "loop_wx" and "loop_numpy" rules share: nothing forced or traced by torch.compile, at most
    CPU_WX_ROWS_PER_EXPERT rows per expert, float32 CPU operands and at least CPU_WX_MIN_WEIGHT_BYTES per expert's
    weight (GEMMs that stream their weights: decoding). Each rule adds its weight layout (and "loop_numpy" its
    machine). Reads shapes, dtypes and devices only."""
    return (_forced is None and rows <= CPU_WX_ROWS_PER_EXPERT * num_experts
            and a.device.type == "cpu" and b.device.type == "cpu"
            and a.dtype == torch.float32 and b.dtype == torch.float32
            and b.shape[-2] * b.shape[-1] * b.element_size() >= CPU_WX_MIN_WEIGHT_BYTES
            and not torch.compiler.is_compiling())


def loop_wx_refusal(a: torch.Tensor, b: torch.Tensor) -> str | None:
    """Why the "loop_wx" path (see CPU_WX_ROWS_PER_EXPERT) should not run the GEMM `a @ b[e]`, or None when it
    should: it is measured for float32 on CPU with b[e] a transposed view of an (O, I) row-major weight.
    Reads device, dtypes and strides only; asked only when a test forces the path (the automatic rule tests the
    same without building a message, which cost ~3 us a call on gpt-oss's (I, O) weights)."""
    if a.device.type != "cpu":
        return f"operands on {a.device.type} (the rule is measured on CPU)"
    if a.dtype != torch.float32 or b.dtype != torch.float32:
        return f"dtypes {a.dtype}, {b.dtype} (the rule is measured for float32)"
    if b.stride(-2) != 1:
        return f"a weight with strides {b.stride()} (it is stored (I, O), not (O, I): the flip would be slower)"
    return None


def forward_runs_loop_numpy(a: torch.Tensor, b: torch.Tensor, rows: int, num_experts: int) -> bool:
    """Whether the forward GEMM `a @ b[e]` over `rows` rows of `num_experts` experts runs "loop_numpy": when a test
    forces it (RuntimeError if `loop_numpy_refusal` objects), or, with nothing forced or traced, for at most
    CPU_WX_ROWS_PER_EXPERT rows per expert of float32 CPU operands whose b[e] is a contiguous (I, O) weight of at least
    CPU_WX_MIN_WEIGHT_BYTES on a machine where CPU_NUMPY_BLAS holds. Reads shapes and strides (the machine test last).
    The offload runtime asks it too, to compute as the resident layer does."""
    if _forced == "loop_numpy":
        refusal = loop_numpy_refusal(a, b)
        if refusal is not None:
            raise RuntimeError(f"moekit.ops.grouped.force('loop_numpy'): the forward GEMM cannot run it: {refusal}")
        return True
    return (_streams_weights(a, b, rows, num_experts)
            and b.stride(-1) == 1 and b.stride(-2) == b.shape[-1]  # each expert's (I, O) weight row-major
            and not torch.jit.is_tracing() and numpy_blas_streams_faster())


def loop_numpy_refusal(a: torch.Tensor, b: torch.Tensor) -> str | None:
    """Why the "loop_numpy" path (see CPU_NUMPY_BLAS) cannot run the GEMM `a @ b[e]`, or None when it can: numpy
    computes float32 CPU arrays (any strides). Reads device and dtypes only."""
    if torch.jit.is_tracing():  # numpy's GEMMs are invisible to the tracer: the graph would return `out` unwritten
        return "torch.jit.trace is recording (it cannot see numpy's GEMMs)"
    if a.device.type != "cpu" or b.device.type != "cpu":
        return f"operands on {a.device.type} (numpy computes on CPU)"
    if a.dtype != torch.float32 or b.dtype != torch.float32:
        return f"dtypes {a.dtype}, {b.dtype} (the rule is measured for float32)"
    return None


def _use_kernel(stage: str, a: torch.Tensor, b: torch.Tensor, rows: int, num_experts: int) -> bool:
    """Kernel or loop for one GEMM `a @ b` over `rows` assignments, outside tracing."""
    if _forced is None and a.device.type == "cpu" and rows * CPU_KERNEL_ROWS_PER_EXPERT < num_experts:
        return False  # the CPU shape rule below picks the loop whatever the operands: skip reading them
    refusal = _cached_refusal(a, b)
    if _forced == "kernel":
        if refusal is not None:
            raise RuntimeError(f"moekit.ops.grouped.force('kernel'): the {stage} GEMM cannot run "
                               f"torch._grouped_mm: {refusal}")
        use = True
    elif _forced == "loop" or refusal is not None:
        if _forced is None and a.device.type != "cpu" and a.dtype in _KERNEL_DTYPES and grouped_mm_available():
            _warn_loop_fallback(refusal)
        use = False
    elif a.device.type == "cpu":
        # A shape test (no sync): the kernel unless the rows are so few against E that its fixed cost per
        # group, empty ones included (~5 us each, measured), outweighs what it saves over the loop's
        # Python-side mm per non-empty group (the kernel ran 4-35% faster whenever rows >= E/4).
        use = rows * CPU_KERNEL_ROWS_PER_EXPERT >= num_experts
    else:
        use = True
    return use


def _mm(stage: str, x_NI: torch.Tensor, w_EIO: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    path = _choose(stage, x_NI, w_EIO, x_NI.shape[0], offsets_E.numel())
    if path == "kernel":
        return torch._grouped_mm(x_NI, w_EIO, offs=offsets_E)
    if path == "loop_wx":
        return _loop_wx_mm(x_NI, w_EIO, offsets_E)
    if path == "loop_numpy":
        return _loop_numpy_mm(x_NI, w_EIO, offsets_E)
    return _loop_mm(x_NI, w_EIO, offsets_E) if path == "loop" else _masked_mm(x_NI, w_EIO, offsets_E)


def _weight_grad(dy_NO: torch.Tensor, x_NI: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """dw[e] = dy_e^T @ x_e, (E, O, I); experts without rows get zeros."""
    E = offsets_E.numel()
    dy_ON = dy_NO.t()
    path = _choose("dw", dy_ON, x_NI, dy_NO.shape[0], E)
    if path == "kernel":
        return torch._grouped_mm(dy_ON, x_NI, offs=offsets_E)
    if path == "masked":
        expert_N = _expert_of_rows(offsets_E, dy_NO.shape[0])
        return torch.stack([(dy_NO * (expert_N == e).unsqueeze(1)).t() @ x_NI for e in range(E)])
    if _recording_graph(dy_NO, x_NI):
        ends = offsets_E.tolist()
        return torch.stack([dy_ON[:, start:end] @ x_NI[start:end] if end > start else
                            dy_NO.new_zeros(dy_NO.shape[1], x_NI.shape[1])
                            for start, end in zip([0, *ends[:-1]], ends, strict=True)])
    dw = dy_NO.new_zeros(E, dy_NO.shape[1], x_NI.shape[1])
    start = 0
    for e, end in enumerate(offsets_E.tolist()):
        if end > start:
            torch.mm(dy_ON[:, start:end], x_NI[start:end], out=dw[e])
        start = end
    return dw


class _GroupedLinear(torch.autograd.Function):
    # forward without ctx and a separate setup_context: the form torch.func.grad accepts (vmap would need a vmap rule)
    @staticmethod
    def forward(x_NI, w_EOI, offsets_E):
        return _mm("forward", x_NI, w_EOI.transpose(-2, -1), offsets_E)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, dy_NO):
        x_NI, w_EOI, offsets_E = ctx.saved_tensors
        # NOTE: the CPU kernel rejects non-contiguous gradients (e.g. from chunk/expand).
        dy_NO = dy_NO.contiguous()
        dx = _mm("dx", dy_NO, w_EOI, offsets_E) if ctx.needs_input_grad[0] else None
        dw = _weight_grad(dy_NO, x_NI, offsets_E) if ctx.needs_input_grad[1] else None
        return dx, dw, None


def grouped_linear(x_NI: torch.Tensor, w_EOI: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """Per-expert `F.linear` over rows grouped by expert. Differentiable in x and w.

    x_NI (N, I) rows sorted by expert; w_EOI (E, O, I); offsets_E (E,) cumulative row counts
    (int32; other integer dtypes are converted). Returns (N, O) in x_NI's dtype. Any widths: a GEMM
    the kernel cannot take (see `kernel_refusal`) runs the per-expert loop, forward and backward.
    Low-precision inputs on CPUs without bf16 instructions: see `compute_dtype`.
    """
    if offsets_E.dtype != torch.int32:
        offsets_E = offsets_E.to(torch.int32)
    x_NI = x_NI.contiguous()
    out_dtype = x_NI.dtype
    cdt = compute_dtype(out_dtype, x_NI.device)
    if cdt == out_dtype:
        if not (torch.is_grad_enabled() and (x_NI.requires_grad or w_EOI.requires_grad)):
            # Inference: _GroupedLinear.forward's GEMM without the autograd Function around it (~30 us a
            # call on CPU, which decoding pays twice per MoE layer and token step).
            return _mm("forward", x_NI, w_EOI.transpose(-2, -1), offsets_E)
        return _GroupedLinear.apply(x_NI, w_EOI, offsets_E)
    if torch.compiler.is_compiling():  # no data-dependent subset of experts under tracing
        return _GroupedLinear.apply(x_NI.to(cdt), w_EOI.to(cdt), offsets_E).to(out_dtype)
    # NOTE: nonzero() reads the counts, but this branch is CPU-only (compute_dtype): no device to sync with.
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


@functools.cache
def _warn_loop_fallback(refusal: str) -> None:
    warnings.warn(f"moekit: an expert GEMM runs as a per-expert loop (slower) because torch._grouped_mm cannot "
                  f"take it: {refusal}; expert and model widths whose rows are multiples of 16 bytes run the kernel",
                  stacklevel=4)


@contextlib.contextmanager
def force(path: str) -> Iterator[collections.Counter]:
    """Test-only: run every grouped GEMM inside the block through `path`, and count them.

    path: "kernel" (`torch._grouped_mm`; a GEMM the kernel cannot take raises RuntimeError instead of
    falling back, so a test that forces the kernel never passes on the loop), "loop", "loop_wx" or "loop_numpy"
    (forward GEMMs, on any machine; one they cannot take raises RuntimeError; dx and dw run "loop") or "masked" (the
    path traced GEMMs take when the kernel refuses them).
    Yields the Counter of `record()`. Process-wide and not thread-safe; the innermost `force` wins.
    """
    global _forced
    if path not in PATHS:
        raise ValueError(f"moekit.ops.grouped.force(): path must be one of {PATHS}, got {path!r}")
    previous, _forced = _forced, path
    try:
        with record() as ran:
            yield ran
    finally:
        _forced = previous


@contextlib.contextmanager
def record() -> Iterator[collections.Counter]:
    """Count the grouped GEMMs run inside the block without changing any choice.

    Yields a Counter keyed (stage, path): stage in STAGES ("forward", "dx", "dw"), path in PATHS,
    e.g. `ran["dw", "kernel"]` is the number of weight-gradient GEMMs that ran the kernel; ("ffn", "per_expert")
    counts FFNs run expert by expert (`per_expert_ffn`). An offloaded model's GEMMs count once per cache step
    ("loop": one mm per expert, bitwise the kernel's numbers; "loop_wx"; "loop_numpy").
    """
    ran: collections.Counter = collections.Counter()
    _recorders.append(ran)
    try:
        yield ran
    finally:
        _recorders[:] = [r for r in _recorders if r is not ran]
