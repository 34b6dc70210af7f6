"""The one expert FFN (moekit.ops.ffn): its formula, and that no other copy of it exists in src/."""

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from moekit.experts import ExpertBank, SharedExpert
from moekit.ops.ffn import expert_ffn, hidden
from moekit.ops.reference import moe_reference

SRC = Path(__file__).resolve().parents[2] / "src" / "moekit"
# Places that may name an activation function without computing an expert FFN, and why.
NOT_AN_FFN = {
    "hf/detect.py": "reads a transformers block's activation by value, comparing it with moekit's",
}


def test_swiglu_and_gelu_formulas():
    g = torch.Generator().manual_seed(0)
    x_ND = torch.randn(5, 6, dtype=torch.float64, generator=g)
    gate_FD, up_FD = torch.randn(3, 6, dtype=torch.float64, generator=g), torch.randn(3, 6, dtype=torch.float64, generator=g)
    down_DF = torch.randn(6, 3, dtype=torch.float64, generator=g)
    want = (F.silu(x_ND @ gate_FD.T) * (x_ND @ up_FD.T)) @ down_DF.T
    torch.testing.assert_close(expert_ffn(x_ND, torch.cat([gate_FD, up_FD]), down_DF, "swiglu"), want)
    want = F.gelu(x_ND @ up_FD.T) @ down_DF.T
    torch.testing.assert_close(expert_ffn(x_ND, up_FD, down_DF, "gelu"), want)


def test_unknown_activation_is_refused():
    with pytest.raises(ValueError, match="'tanh' is unknown; expected one of"):
        hidden(torch.zeros(2, 4), "tanh")


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_bank_reference_and_shared_expert_compute_the_same_ffn(activation):
    torch.manual_seed(0)
    bank = ExpertBank(3, 8, 5, activation).double()
    counts_E = torch.tensor([2, 0, 3])
    x_ND = torch.randn(5, 8, dtype=torch.float64)
    expert_N = torch.repeat_interleave(torch.arange(3), counts_E)
    fast = bank(x_ND, torch.cumsum(counts_E, 0).to(torch.int32))
    ref = moe_reference(x_ND, torch.arange(5), expert_N, torch.ones(5, dtype=torch.float64), bank)
    torch.testing.assert_close(fast, ref)
    # The shared expert is a dense FFN with the same rule: give it expert 2's weights.
    shared = SharedExpert(8, 5, activation).double()
    with torch.no_grad():
        w_in = bank.gate_up_proj[2] if activation == "swiglu" else bank.up_proj[2]
        if activation == "swiglu":
            shared.gate_proj.weight.copy_(w_in[:5])
            shared.up_proj.weight.copy_(w_in[5:])
        else:
            shared.up_proj.weight.copy_(w_in)
        shared.down_proj.weight.copy_(bank.down_proj[2])
    torch.testing.assert_close(shared(x_ND[2:]), fast[2:])


def test_no_other_copy_of_the_ffn_math_in_src():
    pattern = re.compile(r"\b(?:F|functional)\.(?:silu|gelu)\(|\btorch\.(?:silu|gelu)\(|\bnn\.(?:SiLU|GELU)\(")
    found = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        if rel == "ops/ffn.py" or rel in NOT_AN_FFN:
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                found.append(f"{rel}:{i}: {line.strip()}")
    assert not found, "expert FFN math outside moekit/ops/ffn.py (use expert_ffn / hidden / swiglu):\n" + "\n".join(found)


def test_clamped_swiglu_is_gpt_oss_formula():
    """gpt-oss (openai/gpt-oss `swiglu`): interleaved gate/up, gate.clamp(max=7), up.clamp(+-7),
    (up + 1) * gate * sigmoid(1.702 * gate)."""
    from moekit.ops.ffn import Activation

    h = torch.randn(5, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 10
    gate, up = h[:, ::2].clamp(max=7.0), h[:, 1::2].clamp(min=-7.0, max=7.0)
    want = (up + 1) * (gate * torch.sigmoid(1.702 * gate))
    got = Activation("swiglu", limit=7.0, alpha=1.702, up_offset=1.0, interleaved=True)(h)
    torch.testing.assert_close(got, want)
    # limit alone: DeepSeek-V4's clamped SiLU on [gate; up]
    g2, u2 = h.chunk(2, dim=-1)
    torch.testing.assert_close(Activation("swiglu", limit=5.0)(h), F.silu(g2.clamp(max=5.0)) * u2.clamp(-5.0, 5.0))


def test_clamp_after_the_activation_is_step37_formula():
    """Step-3.7 (`Step3p7Experts._apply_gate`): act(gate).clamp(max=limit) * up.clamp(+-limit); the clamp after
    the SiLU differs from gpt-oss's before it wherever the gate is large. A MoE layer built with
    activation_clamp_after computes it in its bank."""
    from moekit.config import MoEConfig
    from moekit.layers.moe import MoELayer
    from moekit.ops.ffn import Activation

    h = torch.randn(5, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 10
    gate, up = h.chunk(2, dim=-1)
    want = F.silu(gate).clamp(max=3.0) * up.clamp(min=-3.0, max=3.0)
    after = Activation("swiglu", limit=3.0, clamp_after=True)
    torch.testing.assert_close(after(h), want)
    assert not torch.allclose(Activation("swiglu", limit=3.0)(h), want)
    assert "limit=3 after act" in after.describe()
    with pytest.raises(ValueError, match="clamp_after=True needs a limit"):
        Activation("swiglu", clamp_after=True)
    layer = MoELayer(MoEConfig(d_model=8, d_expert=6, num_experts=4, activation_limit=3.0,
                               activation_clamp_after=True))
    assert layer.experts.act == after
    with pytest.raises(ValueError, match="MoEConfig.activation_clamp_after=True is invalid"):
        MoEConfig(d_model=8, d_expert=6, num_experts=4, activation_clamp_after=True).validate()


@pytest.mark.parametrize("activation", ["swiglu", "geglu", "geglu_tanh", "reglu", "gelu", "gelu_tanh", "relu",
                                        "relu2", "silu", "clamped", "clamped_after"])
@pytest.mark.parametrize("layout", ["standard", "gpt_oss", "dbrx"])
def test_every_activation_and_layout_kernel_matches_the_reference_forward_and_backward(activation, layout):
    from moekit.experts.bank import ExpertLayout
    from moekit.ops.ffn import Activation
    from moekit.ops.grouped import force, grouped_mm_available

    if not grouped_mm_available():
        pytest.skip("torch._grouped_mm is missing")
    act = {"clamped": Activation("swiglu", 7.0, 1.702, 1.0),
           "clamped_after": Activation("swiglu", 2.0, clamp_after=True)}.get(activation) or Activation(activation)
    lay = {"standard": ExpertLayout(),
           "gpt_oss": ExpertLayout(in_transposed=True, out_transposed=True, interleaved=act.gated, bias=True),
           "dbrx": ExpertLayout(split=True, flat=True)}[layout]
    if lay.split and not act.gated:
        pytest.skip("separate gate/up stacks are gated by definition")
    torch.manual_seed(0)
    bank = ExpertBank(3, 16, 16, act, lay)
    with torch.no_grad():
        for p in bank.parameters():
            p.normal_(0, 0.5)
    counts_E = torch.tensor([5, 0, 7])
    offsets_E = torch.cumsum(counts_E, 0).to(torch.int32)
    x_ND = (torch.randn(12, 16) * 3).requires_grad_()
    expert_N = torch.repeat_interleave(torch.arange(3), counts_E)
    with force("kernel") as ran:
        fast = bank(x_ND, offsets_E)
        fast.square().sum().backward()
    assert ran["forward", "kernel"] >= 2 and ran["dw", "kernel"] >= 2  # the fast path ran
    fast_grads = [p.grad.clone() for p in bank.parameters()]
    fast_dx, x_ND.grad = x_ND.grad.clone(), None
    bank.zero_grad()
    ref = moe_reference(x_ND, torch.arange(12), expert_N, torch.ones(12), bank)
    ref.square().sum().backward()
    torch.testing.assert_close(fast, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fast_dx, x_ND.grad, atol=1e-3, rtol=1e-4)
    for got, p in zip(fast_grads, bank.parameters(), strict=True):
        torch.testing.assert_close(got, p.grad, atol=1e-3, rtol=1e-4)


SCRATCH_ACTIVATIONS = {
    "gpt_oss": dict(name="swiglu", limit=7.0, alpha=1.702, up_offset=1.0, interleaved=True),
    "clamped_silu": dict(name="swiglu", limit=5.0),
    "clamp_after": dict(name="swiglu", limit=2.0, clamp_after=True),
    "geglu_offset": dict(name="geglu", up_offset=1.0),
    "swiglu": dict(name="swiglu"),
}


@pytest.mark.parametrize("shape", [(7, 12), (33, 2 * 517)])  # and long rows: vectorised CPU loops with tails
@pytest.mark.parametrize("setting", list(SCRATCH_ACTIVATIONS))
def test_scratch_activation_is_bitwise_the_plain_one_in_place_and_out_of_place_under_grad(setting, shape, monkeypatch):
    """`Activation(h, scratch=True)` (the bank's fast path): in inference it overwrites h with `glu_` (interleaved
    columns: clamped into contiguous copies), giving bitwise the plain `glu`'s values; where a gradient is recorded
    it leaves h alone and matches the plain forward and backward."""
    from moekit.ops.ffn import Activation

    act = Activation(**SCRATCH_ACTIVATIONS[setting])
    h = torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * 6
    want = act(h.clone())
    calls = []
    glu_ = Activation.glu_
    monkeypatch.setattr(Activation, "glu_", lambda self, g, u: calls.append(1) or glu_(self, g, u))
    scratch = h.clone()
    with torch.no_grad():
        got = act(scratch, scratch=True)
    assert calls == [1]  # the in-place path ran
    assert torch.equal(got, want)
    # it wrote into its scratch (clamps, offset), but for interleaved columns, which it clamps into copies
    assert (setting in ("swiglu", "gpt_oss")) == torch.equal(scratch, h)
    # with a gradient recorded: the plain path, h untouched, same values and gradient
    h_ref, h_fast = h.clone().requires_grad_(), h.clone().requires_grad_()
    act(h_ref).square().sum().backward()
    out = act(h_fast, scratch=True)
    out.square().sum().backward()
    assert calls == [1] and torch.equal(h_fast.detach(), h)
    assert torch.equal(out.detach(), want)
    torch.testing.assert_close(h_fast.grad, h_ref.grad, atol=0, rtol=0)


@pytest.mark.parametrize("path", ["kernel", "loop"])
def test_gpt_oss_bank_inference_fast_path_matches_the_reference(path, monkeypatch):
    """A bank with per-expert biases in inference: each row's expert found from the offsets (searchsorted),
    biases added in place and the clamped SwiGLU computed in place (`glu_`, asserted to run), against the
    reference loop (one expert at a time, plain broadcast biases); experts without rows included."""
    from moekit.experts.bank import ExpertLayout
    from moekit.ops.ffn import Activation
    from moekit.ops.grouped import force, grouped_mm_available

    if path == "kernel" and not grouped_mm_available():
        pytest.skip("torch._grouped_mm is missing")
    act = Activation("swiglu", 7.0, 1.702, 1.0)
    bank = ExpertBank(4, 16, 16, act, ExpertLayout(in_transposed=True, out_transposed=True, interleaved=True,
                                                   bias=True))
    with torch.no_grad():
        for p in bank.parameters():
            p.normal_(0, 0.5, generator=torch.Generator().manual_seed(p.numel()))
    counts_E = torch.tensor([3, 0, 6, 1])
    offsets_E = torch.cumsum(counts_E, 0).to(torch.int32)
    x_ND = torch.randn(10, 16, generator=torch.Generator().manual_seed(3)) * 3
    calls = []
    glu_ = Activation.glu_
    monkeypatch.setattr(Activation, "glu_", lambda self, g, u: calls.append(1) or glu_(self, g, u))
    with torch.no_grad(), force(path) as ran:
        fast = bank(x_ND, offsets_E)
    assert calls == [1] and ran["forward", path] == 2
    expert_N = torch.repeat_interleave(torch.arange(4), counts_E)
    with torch.no_grad():
        ref = moe_reference(x_ND, torch.arange(10), expert_N, torch.ones(10), bank)
    torch.testing.assert_close(fast, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("layout", ["standard", "gpt_oss", "dbrx", "gelu"])
def test_per_expert_route_matches_the_grouped_gemms_bitwise(layout, monkeypatch):
    """CPU inference with many rows per expert runs the bank expert by expert (`per_expert_ffn`, asserted to run):
    bitwise the grouped GEMMs' output (the kernel forced, which turns the route off), experts without rows
    included; with autograd on, or below the size rule, the grouped GEMMs run."""
    from moekit.experts.bank import ExpertLayout
    from moekit.ops import grouped
    from moekit.ops.ffn import Activation

    if not grouped.grouped_mm_available():
        pytest.skip("torch._grouped_mm is missing")
    act = Activation("swiglu", 7.0, 1.702, 1.0) if layout == "gpt_oss" else Activation(
        "gelu" if layout == "gelu" else "swiglu")
    lay = {"standard": ExpertLayout(), "gelu": ExpertLayout(),
           "gpt_oss": ExpertLayout(in_transposed=True, out_transposed=True, interleaved=True, bias=True),
           "dbrx": ExpertLayout(split=True, flat=True)}[layout]
    bank = ExpertBank(4, 32, 16, act, lay)
    with torch.no_grad():
        for p in bank.parameters():
            p.normal_(0, 0.5, generator=torch.Generator().manual_seed(p.numel()))
    counts_E = torch.tensor([30, 0, 50, 20])
    offsets_E = torch.cumsum(counts_E, 0).to(torch.int32)
    x_ND = torch.randn(100, 32, generator=torch.Generator().manual_seed(3))
    X = 32 if act.gated else 16
    monkeypatch.setattr(grouped, "CPU_PER_EXPERT_BYTES", 100 * X * 4 // 4)  # 100 rows of X fp32 over 4 experts
    with torch.no_grad():
        with grouped.record() as ran:
            fast = bank(x_ND, offsets_E)
        assert ran["ffn", "per_expert"] == 1 and ran["forward", "kernel"] == 0
        with grouped.force("kernel") as ran:
            want = bank(x_ND, offsets_E)
        assert ran["ffn", "per_expert"] == 0 and ran["forward", "kernel"] == (3 if lay.split else 2)
        with grouped.record() as ran:
            bank(x_ND[:99], torch.tensor([30, 30, 80, 99], dtype=torch.int32))  # just below the rule
        assert ran["ffn", "per_expert"] == 0
    assert torch.equal(fast, want)
    with grouped.record() as ran:
        grad_mode = bank(x_ND, offsets_E)
    assert ran["ffn", "per_expert"] == 0
    torch.testing.assert_close(grad_mode.detach(), want, atol=1e-6, rtol=0)


def test_per_expert_route_leaves_few_fp32_rows_per_expert_to_the_grouped_gemms():
    """Where the grouped forward may run "loop_wx" (float32, at most CPU_WX_ROWS_PER_EXPERT rows per expert), the
    bank stays grouped even when a wide hidden layer reaches the byte rule (2F = 32768: 4 rows per expert over 2
    experts hold 512 KiB each): one expert's F.linear is not loop_wx's W @ x^T bit for bit, and the offload runtime
    and the expert adapters compute as the grouped GEMMs do (tests/offload/test_layouts.py,
    tests/adapters/test_experts.py)."""
    from moekit.ops import grouped

    E, X = 2, 32768
    rows = grouped.CPU_WX_ROWS_PER_EXPERT * E
    assert rows * X * 4 >= grouped.CPU_PER_EXPERT_BYTES * E  # the byte rule alone would take the route
    with torch.no_grad():
        assert not grouped.per_expert_ffn(torch.zeros(rows, 8), X, E)
        assert grouped.per_expert_ffn(torch.zeros(rows + 1, 8), X, E)  # more rows: loop_wx's row rule is out
