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
    "hf/detect.py": "checks that a transformers block's activation *is* SiLU by comparing it with F.silu",
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
    with pytest.raises(ValueError, match="'relu' is unknown; expected one of"):
        hidden(torch.zeros(2, 4), "relu")


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
