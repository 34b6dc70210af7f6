"""The grouped GEMM, forward and backward (dx and dw), against a float64 per-expert loop, with the
path that ran (kernel or loop) asserted: float64 can only run the loop, so the kernel is checked
in fp32 (and through the bf16 paths), and odd widths are checked to fall back, not to crash."""

import copy

import numpy as np
import pytest
import threadpoolctl
import torch

from moekit.ops import grouped
from moekit.ops.grouped import grouped_linear, kernel_refusal
from moekit.ops.grouped import numpy_blas_streams_faster as real_numpy_blas_rule

# tests/conftest.py patches grouped.numpy_blas_streams_faster (the machine part of the "loop_numpy" rule) for every
# test; real_numpy_blas_rule is the function itself, bound at import.

COUNTS = [[3, 0, 7, 2], [0, 0, 0, 5], [1], [4, 4, 4, 4, 4, 4, 4, 4], [0, 0]]


def loop_linear(x_NI, w_EOI, counts):
    outs, start = [], 0
    for e, c in enumerate(counts):
        outs.append(x_NI[start:start + c] @ w_EOI[e].T)
        start += c
    return torch.cat(outs) if outs else x_NI.new_zeros(0, w_EOI.shape[1])


def offsets(counts):
    return torch.cumsum(torch.tensor(counts), 0).to(torch.int32)


def run_and_reference(x, w, counts):
    """(y, dx, dw) of grouped_linear and of a float64 loop on the same values, for one output gradient."""
    y = grouped_linear(x, w, offsets(counts))
    g = torch.randn(y.shape, dtype=torch.float64)
    dx, dw = torch.autograd.grad(y, (x, w), g.to(y.dtype))
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    y64 = loop_linear(x64, w64, counts)
    dx64, dw64 = torch.autograd.grad(y64, (x64, w64), g) if y64.numel() else (torch.zeros_like(x64),
                                                                               torch.zeros_like(w64))
    return (y, dx, dw), (y64, dx64, dw64)


def ran_on(path: str, gemms: int = 1) -> dict:
    """What `record()` counts when every stage of `gemms` GEMMs runs on forced `path` ("loop_wx" and "loop_numpy" are
    forward paths: their dx and dw run the loop)."""
    forward_only = path in ("loop_wx", "loop_numpy")
    return {(stage, "loop" if forward_only and stage != "forward" else path): gemms for stage in grouped.STAGES}


@pytest.mark.parametrize("dtype,path,tol", [(torch.float64, "loop", 1e-12), (torch.float32, "kernel", 1e-5),
                                            (torch.float32, "loop", 1e-5), (torch.float32, "loop_wx", 1e-5),
                                            (torch.float32, "loop_numpy", 1e-5),
                                            (torch.float64, "masked", 1e-12), (torch.float32, "masked", 1e-5)])
@pytest.mark.parametrize("counts", COUNTS)
def test_grouped_linear_matches_float64_loop(dtype, path, tol, counts):
    E, O, I = len(counts), 12, 8
    x = torch.randn(sum(counts), I, dtype=dtype, requires_grad=True)
    w = torch.randn(E, O, I, dtype=dtype, requires_grad=True)
    with grouped.force(path) as ran:
        got, want = run_and_reference(x, w, counts)
    # Exactly one GEMM per stage, each on the forced path: the comparison below is of that path.
    assert ran == ran_on(path)
    for name, a, b in zip(("y", "dx", "dw"), got, want, strict=True):
        assert a.dtype == dtype
        torch.testing.assert_close(a.double(), b, atol=tol, rtol=tol, msg=name)
    for e, c in enumerate(counts):
        if c == 0:
            assert not got[2][e].any()  # an expert without rows gets exactly zero weight gradient


@pytest.mark.parametrize("path", grouped.PATHS)
def test_torch_func_grad_equals_autograd_on_every_path(path):
    """torch.func.grad accepts the grouped GEMM's autograd Function (forward and
    setup_context apart) and runs its backward on torch.func's storage-less tensor wrappers: the same gradients as
    torch.autograd.grad, on each forced path."""
    counts = [2, 0, 1, 3]
    x = torch.randn(6, 32)
    w = torch.randn(4, 64, 32)
    offs = offsets(counts)

    def loss(x_, w_):
        return grouped_linear(x_, w_, offs).square().sum()

    with grouped.force(path) as ran:
        got = torch.func.grad(loss, argnums=(0, 1))(x, w)
        xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
        want = torch.autograd.grad(loss(xg, wg), (xg, wg))
    assert ran["forward", path] == 2
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_kernel_and_loop_agree_bitwise_in_fp32():
    """The CPU kernel runs one mm per group: the same numbers as the loop (offloading relies on it)."""
    counts = [5, 0, 9, 2]
    x = torch.randn(16, 32, requires_grad=True)
    w = torch.randn(4, 64, 32, requires_grad=True)
    outs = {}
    for path in ("kernel", "loop"):
        with grouped.force(path) as ran:
            y = grouped_linear(x, w, offsets(counts))
            outs[path] = (y, *torch.autograd.grad(y, (x, w), torch.ones_like(y)))
        assert ran == {(stage, path): 1 for stage in grouped.STAGES}
    for a, b in zip(outs["kernel"], outs["loop"], strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("check", [torch.autograd.gradcheck, torch.autograd.gradgradcheck])
def test_grouped_linear_gradcheck_float64(check):
    """First and second derivatives (gradgradcheck: create_graph=True, so the loop's backward records its GEMMs: no
    out= tensor while a graph is recorded, which autograd refuses)."""
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 6, 4, dtype=torch.float64, requires_grad=True)
    offs = offsets([2, 0, 3])
    with grouped.record() as ran:
        assert check(lambda a, b: grouped_linear(a, b, offs), (x, w))
    assert ran["forward", "loop"] > 0 and ran["dx", "loop"] > 0 and ran["dw", "loop"] > 0
    assert not any(path == "kernel" for _, path in ran)  # float64: the kernel cannot take it


def test_automatic_choice_runs_the_kernel_with_many_rows_per_expert():
    counts = [40, 0, 30, 10]  # 80 rows >= 4 x 4 experts
    x = torch.randn(80, 32, requires_grad=True)
    w = torch.randn(4, 64, 32, requires_grad=True)
    with grouped.record() as ran:
        got, want = run_and_reference(x, w, counts)
    assert ran == {(stage, "kernel"): 1 for stage in grouped.STAGES}
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a.double(), b, atol=1e-4, rtol=1e-4)


def test_automatic_choice_loops_on_cpu_only_with_rows_far_fewer_than_experts():
    """The CPU threshold (grouped.CPU_KERNEL_ROWS_PER_EXPERT, measured): the loop only when rows * 4 < E,
    where the kernel's cost per (mostly empty) group outweighs its saving; decode-sized calls (8 rows over
    16 experts, as benchmarks/hf.py decodes) run the kernel (weights this small are under "loop_wx"'s size
    floor), and both give the reference's result."""
    w = torch.randn(16, 64, 32)
    for counts, path in (([1, 0, 0] + [0] * 13, "loop"), ([0, 3] + [0] * 14, "loop"), ([0, 4] + [0] * 14, "kernel"),
                         ([1, 0] * 8, "kernel")):
        x = torch.randn(sum(counts), 32, requires_grad=True)
        ww = w.clone().requires_grad_()
        with grouped.record() as ran:
            got, want = run_and_reference(x, ww, counts)
        assert ran == {(stage, path): 1 for stage in grouped.STAGES}, counts
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a.double(), b, atol=1e-4, rtol=1e-4)


def test_few_rows_per_expert_run_weight_first_on_cpu_where_the_weight_is_stored_out_by_in():
    """grouped.CPU_WX_ROWS_PER_EXPERT and CPU_WX_MIN_WEIGHT_BYTES (measured): a float32 forward over <= 4 rows per
    expert whose weight is stored (O, I) and holds >= 512 KiB per expert runs "loop_wx"; stored (I, O) (gpt-oss,
    Llama 4: the flip would be slower), smaller, in bfloat16 or with more rows it does not. Every choice gives the
    float64 loop's values, forward and backward."""
    E, O, I = 4, 512, 256  # 512 KiB per expert in fp32: at the size floor
    assert O * I * 4 == grouped.CPU_WX_MIN_WEIGHT_BYTES
    w_EOI = torch.randn(E, O, I) * I ** -0.5
    w_stored_IO = (torch.randn(E, I, O) * I ** -0.5).transpose(1, 2)  # the same (E, O, I) shape, stored (I, O)
    w_small = w_EOI[:, :O // 2].contiguous()  # 256 KiB per expert: under the floor
    cases = [(w_EOI, [1, 0, 1, 0], "loop_wx"), (w_EOI, [4] * 4, "loop_wx"), (w_EOI, [1, 0, 0, 0], "loop_wx"),
             (w_EOI, [5] * 4, "kernel"), (w_stored_IO, [1, 0, 1, 0], "kernel"), (w_small, [1, 0, 1, 0], "kernel")]
    for w, counts, path in cases:
        x = torch.randn(sum(counts), I, requires_grad=True)
        with grouped.record() as ran:
            got, want = run_and_reference(x, w.detach().requires_grad_(), counts)
        assert ran["forward", path] == 1, (counts, dict(ran))
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a.double(), b, atol=1e-4, rtol=1e-4)
    with torch.no_grad(), grouped.record() as ran:
        grouped_linear(torch.randn(2, I, dtype=torch.bfloat16), w_EOI.bfloat16(), offsets([1, 0, 1, 0]))
    assert ran["forward", "loop_wx"] == 0
    with grouped.force("loop_wx"), pytest.raises(RuntimeError, match=r"loop_wx.*stored \(I, O\)"):
        grouped_linear(torch.randn(2, I), w_stored_IO, offsets([1, 0, 1, 0]))


def test_few_rows_per_expert_run_numpy_blas_where_the_weight_is_stored_in_by_out(monkeypatch):
    """grouped.CPU_NUMPY_BLAS (measured): where the machine rule holds (set here), a float32 forward over <= 4 rows per
    expert whose weight is stored (I, O) (gpt-oss, Llama 4) and holds >= 512 KiB per expert runs "loop_numpy"; stored
    (O, I) it runs "loop_wx"; smaller, with more rows, in bfloat16 or where the machine rule fails it does not. Every
    choice gives the float64 loop's values, forward and backward (dx and dw: their own rule)."""
    E, O, I = 4, 512, 256
    w_EOI = torch.randn(E, O, I) * I ** -0.5
    w_stored_IO = (torch.randn(E, I, O) * I ** -0.5).transpose(1, 2)  # the same (E, O, I) shape, stored (I, O)
    w_small = w_stored_IO[:, :O // 2]  # 256 KiB per expert, a view: under the floor, and not contiguous per expert
    w_small_packed = w_small.transpose(1, 2).contiguous().transpose(1, 2)
    cases = [(True, w_stored_IO, [1, 0, 1, 0], "loop_numpy"), (True, w_stored_IO, [4] * 4, "loop_numpy"),
             (True, w_stored_IO, [1, 2, 0, 0], "loop_numpy"), (True, w_stored_IO, [5] * 4, "kernel"),
             (True, w_EOI, [1, 0, 1, 0], "loop_wx"), (True, w_small_packed, [1, 0, 1, 0], "kernel"),
             (False, w_stored_IO, [1, 0, 1, 0], "kernel")]
    # 512 KiB per expert stored (I, O) but not row-major per expert (columns of a wider stack): not "loop_numpy"
    w_wide_view = (torch.randn(E, I, 2 * O) * I ** -0.5)[..., :O].transpose(1, 2)
    cases.append((True, w_wide_view, [1, 0, 1, 0], "kernel"))
    for machine, w, counts, path in cases:
        monkeypatch.setattr(grouped, "numpy_blas_streams_faster", lambda m=machine: m)
        x = torch.randn(sum(counts), I, requires_grad=True)
        with grouped.record() as ran:
            got, want = run_and_reference(x, w.detach().requires_grad_(), counts)
        assert ran["forward", path] == 1, (machine, counts, dict(ran))
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a.double(), b, atol=1e-4, rtol=1e-4)
    with torch.no_grad(), grouped.record() as ran:  # the rule holds, but bfloat16 has no numpy GEMM
        grouped_linear(torch.randn(2, I, dtype=torch.bfloat16), w_stored_IO.bfloat16(), offsets([1, 0, 1, 0]))
    assert ran["forward", "loop_numpy"] == 0
    with grouped.force("loop_numpy"), pytest.raises(RuntimeError, match=r"loop_numpy.*dtypes"):
        grouped_linear(torch.randn(2, I, dtype=torch.bfloat16), w_stored_IO.bfloat16(), offsets([1, 0, 1, 0]))


def test_jit_trace_does_not_run_numpy_blas(monkeypatch):
    """torch.jit.trace records torch ops only: a "loop_numpy" GEMM under it left a traced graph that returns the
    unwritten `new_empty` output (a wrapped gpt-oss traced with OMP_NUM_THREADS=1 gave logits 7.6 off, even for the
    traced input). Under the tracer the rule does not hold, and forcing the path is refused."""
    monkeypatch.setattr(grouped, "numpy_blas_streams_faster", lambda: True)
    E, O, I = 4, 512, 256
    w_stored_IO = (torch.randn(E, I, O) * I ** -0.5).transpose(1, 2)
    offs = offsets([1, 0, 1, 0])
    x = torch.randn(2, I)

    def f(x_NI):
        return grouped_linear(x_NI, w_stored_IO, offs)

    with torch.no_grad():
        want = f(x)
        with grouped.record() as ran:
            traced = torch.jit.trace(f, (x,), check_trace=False)
        assert ran["forward", "loop_numpy"] == 0, dict(ran)
        torch.testing.assert_close(traced(x), want)
        with grouped.force("loop_numpy"), pytest.raises(RuntimeError, match="loop_numpy.*jit.trace"):
            torch.jit.trace(f, (x,), check_trace=False)


def test_numpy_blas_bits_do_not_depend_on_where_the_operands_lie():
    """OpenBLAS's result for a row depends on its GEMM's row count, not on where the weight, the input or the output
    start: the offload runtime (`mm_rows_numpy` over cache slots) gets the resident stack's bits."""
    E, O, I = 3, 42, 129  # O * I % 4 != 0: experts of a contiguous stack start off 16-byte alignment
    w_IO = torch.randn(E, I, O)
    counts = [1, 2, 1]
    x = torch.randn(4, I)
    with torch.no_grad(), grouped.force("loop_numpy") as ran:
        ref = grouped_linear(x, w_IO.transpose(1, 2), offsets(counts))
        for shift in (1, 2, 3):
            moved = torch.empty(E * I * O + shift)[shift:].view(E, I, O)
            moved.copy_(w_IO)
            x_moved = torch.empty(4 * I + shift)[shift:].view(4, I)
            x_moved.copy_(x)
            assert torch.equal(grouped_linear(x_moved, moved.transpose(1, 2), offsets(counts)), ref), shift
            out = torch.empty(4 * O + shift)[shift:].view(4, O)
            grouped.mm_rows_numpy(x, [w_IO[e].numpy() for e in range(E)], [(0, 1), (1, 3), (3, 4)], out)
            assert torch.equal(out, ref), shift
    assert ran["forward", "loop_numpy"] == 4
    torch.testing.assert_close(ref, torch.stack([x[n] @ w_IO[e] for n, e in enumerate([0, 1, 1, 2])]), atol=1e-4,
                               rtol=1e-4)


@pytest.fixture
def machine(monkeypatch):
    """machine(cpuinfo): the rule's machine reading, from a /proc/cpuinfo of that text (caches cleared)."""
    def read(cpuinfo: str) -> bool:
        monkeypatch.setattr(grouped, "_cpuinfo", lambda: cpuinfo)
        grouped._numpy_openblas_pools.cache_clear()
        return real_numpy_blas_rule()
    yield read
    grouped._numpy_openblas_pools.cache_clear()


AMD_AVX512 = "vendor_id\t: AuthenticAMD\nflags\t\t: fpu sse avx2 avx512f avx512bw\n"


def test_numpy_blas_rule_reads_the_cpu_vendor_the_blas_libraries_and_the_thread_count(machine):
    """CPU_NUMPY_BLAS: an AMD CPU with AVX-512, torch's BLAS MKL, numpy's OpenBLAS at one thread at the time of the
    call."""
    with threadpoolctl.threadpool_limits(limits=1, user_api="blas"):
        assert not machine(AMD_AVX512.replace("AuthenticAMD", "GenuineIntel"))  # MKL's own ground: left alone
        assert not machine("vendor_id\t: AuthenticAMD\nflags\t\t: fpu sse avx2\n")  # AVX2-only AMD: not measured
        amd = machine(AMD_AVX512)
    if not grouped._torch_blas_is_mkl() or "openblas" not in str(
            np.show_config(mode="dicts")["Build Dependencies"]["blas"]["name"]).lower():
        assert not amd
        pytest.skip("torch's BLAS is not MKL or numpy's is not OpenBLAS here: the rule is off, as checked")
    assert amd
    assert grouped._numpy_openblas_pools() is not None  # read once...
    with threadpoolctl.threadpool_limits(limits=2, user_api="blas"):
        assert not real_numpy_blas_rule()  # ...the thread count at each call: two would oversubscribe
    with threadpoolctl.threadpool_limits(limits=1, user_api="blas"):
        assert real_numpy_blas_rule()


def test_numpy_blas_rule_needs_torch_mkl_numpy_openblas_and_a_found_library(machine, monkeypatch):
    """Each machine condition of CPU_NUMPY_BLAS but the vendor and the thread count, taken away one at a time, turns
    the rule off on an AMD machine where it otherwise holds (skipped where it does not hold)."""
    amd = AMD_AVX512
    with threadpoolctl.threadpool_limits(limits=1, user_api="blas"):
        if not machine(amd):
            pytest.skip("the rule does not hold here")
        with monkeypatch.context() as m:
            m.setattr(torch.backends.mkl, "is_available", lambda: False)
            m.setattr(torch.__config__, "show", lambda: "BLAS_INFO=open, LAPACK_INFO=open")
            assert not machine(amd)  # torch's BLAS is not MKL
        with monkeypatch.context() as m:  # built with MKL (FFTs) but its GEMMs call another BLAS
            m.setattr(torch.__config__, "show", lambda: "USE_MKL=ON, BLAS_INFO=open, LAPACK_INFO=open")
            assert torch.backends.mkl.is_available() and not machine(amd)
        with monkeypatch.context() as m:
            config = copy.deepcopy(np.show_config(mode="dicts"))  # numpy's own dict: never mutated
            config["Build Dependencies"]["blas"]["name"] = "accelerate"
            m.setattr(np, "show_config", lambda mode="stdout": config)
            assert not machine(amd)  # numpy's BLAS is not OpenBLAS
        with monkeypatch.context() as m:
            m.setattr(np, "show_config", lambda: None)  # a numpy too old to say
            assert not machine(amd)
        with monkeypatch.context() as m:
            class NoLibraries:
                lib_controllers = []

            m.setattr(threadpoolctl.ThreadpoolController, "select", lambda self, **kw: NoLibraries())
            assert not machine(amd)  # threadpoolctl finds no OpenBLAS: no thread count to read
        with monkeypatch.context() as m:
            config = copy.deepcopy(np.show_config(mode="dicts"))
            config["Build Dependencies"]["blas"]["version"] = "0.0.1"
            m.setattr(np, "show_config", lambda mode="stdout": config)
            assert not machine(amd)  # only another package's OpenBLAS found: not the one numpy calls
        assert machine(amd)  # and each condition back: the rule holds again


@pytest.mark.parametrize("where", ["misaligned", "strided", "cache_slot"])
def test_weight_first_bits_do_not_depend_on_where_the_weight_lies(where):
    """MKL rounds W @ x^T by where W starts and its row stride (mod 16 bytes): "loop_wx" copies a weight that is not
    contiguous and 16-byte aligned, so an expert's result is the same bits whichever copy of it runs (the offload
    runtime's cache slots against the resident stack). Lone rows paired with a neighbour: the neighbour's values
    do not reach them."""
    E, O, I = 3, 42, 129  # O * I % 4 != 0: expert 1 of a contiguous stack starts 8 bytes off 16-byte alignment
    w = torch.randn(E, O, I)
    counts = [1, 2, 1]
    x = torch.randn(4, I)
    with torch.no_grad(), grouped.force("loop_wx") as ran:
        ref = grouped_linear(x, w, offsets(counts))
        if where == "misaligned":
            buf = torch.empty(E * O * I + 2)
            moved = buf[2:].view(E, O, I)  # every expert 8 bytes further
        elif where == "strided":
            moved = torch.empty(E, O, I + 1)[..., :I]  # rows 4 bytes further apart: a view into a wider stack
        else:
            moved = torch.empty(E, O, I)
        moved.copy_(w)
        x2 = x.clone()
        x2[[1, 2]] = 1e3 * torch.randn(2, I)  # the lone rows' neighbours (rows 1 and 2, expert 1's) change
        out = grouped_linear(x, moved, offsets(counts))
        out2 = grouped_linear(x2, w, offsets(counts))
    assert ran["forward", "loop_wx"] == 3
    assert torch.equal(out, ref)
    assert torch.equal(out2[[0, 3]], ref[[0, 3]])
    torch.testing.assert_close(ref, torch.stack([x[n] @ w[e].T for n, e in enumerate([0, 1, 1, 2])]), atol=1e-4,
                               rtol=1e-4)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_weight_first_lone_rows_never_see_a_non_finite_neighbour(bad):
    """A lone row's GEMM column is paired with a neighbouring row, which may be a row past offsets_E[-1] (dropped or
    null-expert assignments: the second GEMM reads them from the first's uninitialised output) or another expert's
    row: NaN or Inf there stays in the dropped column. Rows 0 and 4 are lone (first and last of the group); rows 5-6
    lie past the offsets."""
    E, O, I = 3, 40, 24
    w = torch.randn(E, O, I)
    counts = [1, 3, 1]
    x = torch.randn(7, I)
    with torch.no_grad(), grouped.force("loop_wx") as ran:
        ref = grouped_linear(x, w, offsets(counts))
        for rows in ([5, 6], [1, 5, 6], [3, 5, 6]):  # past the offsets; and the lone rows' in-group neighbours
            x_bad = x.clone()
            x_bad[rows] = bad
            got = grouped_linear(x_bad, w, offsets(counts))
            keep = [n for n in range(5) if n not in rows]
            assert torch.equal(got[keep], ref[keep]), rows
    assert ran["forward", "loop_wx"] == 4


# --------------------------------------------------------------------------------- odd widths (issue 11, item 14)
@pytest.mark.parametrize("I,O", [(37, 32), (32, 37), (33, 129), (1, 32), (32, 1), (129, 74)])
def test_unaligned_widths_fall_back_to_the_loop_forward_and_backward(I, O):
    """torch._grouped_mm raises "strides should be multiple of 16 bytes" on these; each GEMM whose
    operands it cannot take runs the loop, the others still run the kernel."""
    counts = [20, 0, 25, 19]
    x = torch.randn(sum(counts), I, requires_grad=True)
    w = torch.randn(len(counts), O, I, requires_grad=True)
    with grouped.record() as ran:
        got, want = run_and_reference(x, w, counts)
    # Each GEMM reads or writes rows of both widths (fp32: 16-byte rows are multiples of 4 values).
    path = "kernel" if I % 4 == 0 and O % 4 == 0 else "loop"
    assert ran == {(stage, path): 1 for stage in grouped.STAGES}
    for name, a, b in zip(("y", "dx", "dw"), got, want, strict=True):
        torch.testing.assert_close(a.double(), b, atol=1e-4, rtol=1e-4, msg=name)
    # What the kernel itself does with these operands: the refusal is not hypothetical.
    if I % 4:
        with pytest.raises(RuntimeError, match="16 bytes"):
            torch._grouped_mm(x.detach(), w.detach().transpose(-2, -1), offs=offsets(counts))


def test_forcing_the_kernel_on_an_unaligned_width_fails_loudly():
    x = torch.randn(16, 37)
    w = torch.randn(2, 32, 37)
    with grouped.force("kernel"), pytest.raises(RuntimeError, match=r"forward GEMM cannot run .*148 bytes"):
        grouped_linear(x, w, offsets([8, 8]))


def test_fallback_warns_once_off_cpu_and_stays_quiet_on_cpu(recwarn):
    """On an accelerator the loop is the slow path: one warning naming why (the meta device stands in
    for one here). On CPU the kernel runs one mm per expert anyway: no warning."""
    grouped._warn_loop_fallback.cache_clear()
    offs = offsets([8, 8])
    for _ in range(2):
        y = grouped_linear(torch.empty(16, 37, device="meta"), torch.empty(2, 32, 37, device="meta"), offs)
    assert y.shape == (16, 32)
    messages = [str(w.message) for w in recwarn]
    assert len(messages) == 1 and "per-expert loop" in messages[0] and "148 bytes" in messages[0]
    grouped_linear(torch.randn(16, 37), torch.randn(2, 32, 37), offs)
    assert len(recwarn) == 1


def test_refusal_rule_per_dtype_stride_and_pointer():
    w = torch.randn(2, 8, 4)
    assert kernel_refusal(torch.randn(8, 4), w.transpose(-2, -1)) is None  # fp32 rows of 4 = 16 bytes
    bf = torch.randn(8, 4, dtype=torch.bfloat16)
    assert "8 bytes" in kernel_refusal(bf, w.bfloat16().transpose(-2, -1))  # bf16 rows of 4 = 8 bytes
    assert "float64" in kernel_refusal(torch.randn(8, 4, dtype=torch.float64), w.double().transpose(-2, -1))
    assert "dtypes" in kernel_refusal(torch.randn(8, 4), w.bfloat16().transpose(-2, -1))
    shifted = torch.randn(8 * 4 + 1)[1:].view(8, 4)  # contiguous, data pointer 4 bytes off
    assert "aligned" in kernel_refusal(shifted, w.transpose(-2, -1))
    assert "no unit stride" in kernel_refusal(torch.randn(8, 8)[::2, ::2], w.transpose(-2, -1))
    # One output column: the operands pass the kernel's own checks, its result is not the loop's bitwise.
    assert "output row of 1 float32" in kernel_refusal(torch.randn(8, 4), torch.randn(2, 1, 4).transpose(-2, -1))


def test_remembered_refusal_is_the_rule_for_every_operand_layout():
    """`_cached_refusal` (what each GEMM asks) gives kernel_refusal's answer, first computed, then remembered:
    operands that differ only in what the rule ignores (row count, values) share one entry."""
    w = torch.randn(2, 8, 4)
    operands = [(torch.randn(8, 4), w.transpose(-2, -1)), (torch.randn(8, 4, dtype=torch.bfloat16),
                                                            w.bfloat16().transpose(-2, -1)),
                (torch.randn(8, 4, dtype=torch.float64), w.double().transpose(-2, -1)),
                (torch.randn(8, 4), w.bfloat16().transpose(-2, -1)), (torch.randn(8 * 4 + 1)[1:].view(8, 4),
                                                                       w.transpose(-2, -1)),
                (torch.randn(8, 8)[::2, ::2], w.transpose(-2, -1)), (torch.randn(8, 4), torch.randn(2, 1, 4).mT)]
    grouped._refusals.clear()
    for a, b in operands:
        assert grouped._cached_refusal(a, b) == kernel_refusal(a, b)
    remembered = len(grouped._refusals)
    assert remembered == len(operands)
    for a, b in operands:  # answered from memory, still the rule's answer
        assert grouped._cached_refusal(a, b) == kernel_refusal(a, b)
    assert grouped._cached_refusal(torch.randn(3, 4), w.transpose(-2, -1)) is None  # another row count: same entry
    assert len(grouped._refusals) == remembered


def test_misaligned_data_pointer_runs_the_loop_and_matches():
    counts = [10, 6]
    x = torch.randn(16 * 32 + 1)[1:].view(16, 32).requires_grad_()
    w = torch.randn(2, 32, 32, requires_grad=True)
    with grouped.record() as ran:
        got, want = run_and_reference(x, w, counts)
    assert ran["forward", "loop"] == 1
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a.double(), b, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------- low precision
def test_low_precision_runs_in_compute_dtype_and_returns_input_dtype():
    counts = [3, 5]
    x = torch.randn(8, 16, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(2, 32, 16, dtype=torch.bfloat16, requires_grad=True)
    y = grouped_linear(x, w, offsets(counts))
    assert y.dtype == torch.bfloat16
    y_ref = loop_linear(x.float(), w.float(), counts)
    torch.testing.assert_close(y.float(), y_ref, atol=0.1, rtol=0.02)
    y.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.bfloat16


def test_low_precision_native_kernel_with_forced_path():
    """bf16 operands through the kernel itself (few rows per expert keep them in bf16)."""
    counts = [4, 0, 4]
    x = torch.randn(8, 16, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(3, 32, 16, dtype=torch.bfloat16, requires_grad=True)
    with grouped.force("kernel") as ran:
        got, want = run_and_reference(x, w, counts)
    assert ran == {(stage, "kernel"): 1 for stage in grouped.STAGES}
    for name, a, b in zip(("y", "dx", "dw"), got, want, strict=True):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.double(), b, atol=0.3, rtol=0.03, msg=name)


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
    with grouped.record() as ran:
        y = grouped_linear(x, w, offsets(counts))
        x32, w32 = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
        y_ref = loop_linear(x32, w32, counts)
        torch.testing.assert_close(y.float(), y_ref, atol=0.1, rtol=0.02)
        g = torch.randn_like(y_ref)
        (y.float() * g).sum().backward()
        (y_ref * g).sum().backward()
    assert ran == {(stage, "kernel"): 1 for stage in grouped.STAGES}
    torch.testing.assert_close(x.grad.float(), x32.grad, atol=0.2, rtol=0.02)
    torch.testing.assert_close(w.grad.float(), w32.grad, atol=0.5, rtol=0.02)
    for e, c in enumerate(counts):
        if c == 0:
            assert not w.grad[e].any()  # experts without rows get exactly zero gradient


@pytest.mark.parametrize("F", [1, 37])
def test_low_precision_odd_width_both_compute_paths(F):
    """bf16 at an odd width: the native path (few rows) and the fp32 upcast path (many rows) both
    fall back where the kernel cannot take the rows, forward and backward."""
    for counts in ([2, 1], [40, 30]):
        x = torch.randn(sum(counts), F, dtype=torch.bfloat16, requires_grad=True)
        w = torch.randn(2, 32, F, dtype=torch.bfloat16, requires_grad=True)
        with grouped.record() as ran:
            got, want = run_and_reference(x, w, counts)
        assert ran["forward", "loop"] == ran["dx", "loop"] == ran["dw", "loop"] == 1
        for name, a, b in zip(("y", "dx", "dw"), got, want, strict=True):
            torch.testing.assert_close(a.double(), b, atol=0.3, rtol=0.03, msg=name)


# ---------------------------------------------------------------------------------- the switch itself
def test_force_rejects_unknown_paths_and_restores_on_exit():
    with pytest.raises(ValueError, match="kernel"):
        with grouped.force("fast"):
            pass
    x, w, offs = torch.randn(4, 8), torch.randn(4, 8, 8), offsets([1, 1, 1, 1])
    with grouped.record() as outer:
        with grouped.force("kernel") as inner:
            with grouped.force("loop"):
                grouped_linear(x, w, offs)
            grouped_linear(x, w, offs)
        grouped_linear(x, w, offs)  # automatic again: 4 rows over 4 experts run the kernel on CPU
    assert inner == {("forward", "loop"): 1, ("forward", "kernel"): 1}
    assert outer == {("forward", "loop"): 1, ("forward", "kernel"): 2}
    assert grouped._forced is None and grouped._recorders == []
