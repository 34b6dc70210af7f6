"""Expert and model widths the grouped kernel cannot take (rows not a multiple of 16 bytes: F = 37 as
in transformers' tiny test configs, F = 1, F = 129, odd D) run through the MoELayer forward and
backward and equal the reference loop (issue 11, item 14)."""

import pytest
import torch

import moekit
from moekit.ops import grouped


def _layer(D, F, activation="swiglu", E=4, k=2):
    return moekit.MoELayer(moekit.MoEConfig(d_model=D, d_expert=F, num_experts=E, activation=activation,
                                            router=moekit.RouterConfig(k=k)))


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("D,F", [(32, 1), (32, 37), (32, 129), (33, 64), (33, 37)])
def test_odd_widths_equal_the_float64_reference_forward_and_backward(D, F, activation, reference_twin):
    layer = _layer(D, F, activation)
    ref = reference_twin(layer).double()
    x = torch.randn(2, 24, D, requires_grad=True)  # 96 rows over 4 experts: the kernel where it can
    x64 = x.detach().double().requires_grad_()
    g = torch.randn(2, 24, D, dtype=torch.float64)
    with grouped.record() as ran:
        y = layer(x)
        (y * g.float()).sum().backward()
    y64 = ref(x64)
    (y64 * g).sum().backward()
    torch.testing.assert_close(y.double(), y64, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=1e-4, rtol=1e-4)
    for (n, p), p64 in zip(layer.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad.double(), p64.grad, atol=1e-4, rtol=1e-4, msg=n)
    # Both expert GEMMs read or write rows of width D and of width F (2F): all run the loop.
    assert ran == {(stage, "loop"): 2 for stage in grouped.STAGES}


@pytest.mark.parametrize("F", [1, 37, 129])
def test_odd_width_bf16_layer_runs_forward_and_backward(F, reference_twin):
    layer = _layer(32, F).to(torch.bfloat16)
    ref = reference_twin(layer).double()  # the bf16-rounded weights, in float64
    for T in (3, 96):  # few rows per expert (native bf16) and many (fp32 compute on AVX2 CPUs)
        x = torch.randn(T, 32, dtype=torch.bfloat16, requires_grad=True)
        y = layer(x)
        y.float().sum().backward()
        assert y.dtype == x.grad.dtype == layer.experts.down_proj.grad.dtype == torch.bfloat16
        y64 = ref(x.detach().double())
        torch.testing.assert_close(y.double(), y64, atol=0.05, rtol=0.05)
        layer.zero_grad()
