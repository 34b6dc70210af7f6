import pytest
import torch

from moekit.compress import calibrate
from moekit.compress.quantize import (
    QuantizedExpertBank,
    dequantize,
    mixed_bits,
    quantize,
    quantize_tensor,
    super_experts,
)
from moekit.errors import UsageError
from moekit.experts import ExpertBank
from moekit.layers.moe import moe_layers
from moekit.ops import grouped


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group", [8, 32])
def test_dequantise_within_the_analytic_bound(bits, group):
    w_RC = torch.randn(16, 64) * torch.logspace(-2, 1, 16)[:, None]  # rows of very different scales
    packed, scale_RG = quantize_tensor(w_RC, bits, group)
    assert packed.dtype == torch.uint8 and packed.shape == (16, 64 * bits // 8)
    w_hat = dequantize(packed, scale_RG, bits)
    bound_RC = (w_RC.abs().reshape(16, -1, group).amax(-1) / (2 * (2 ** (bits - 1) - 1))).repeat_interleave(group, 1)
    err_RC = (w_hat - w_RC).abs()
    assert bool((err_RC <= bound_RC * (1 + 1e-6) + 1e-12).all())
    # the bound is tight: round to nearest reaches close to half a step somewhere
    assert float((err_RC / bound_RC).max()) > 0.8
    # exactly representable values come back exactly
    q = torch.randint(-(2 ** (bits - 1) - 1), 2 ** (bits - 1), (4, 64)).float()
    q[:, ::group] = 2 ** (bits - 1) - 1
    torch.testing.assert_close(dequantize(*quantize_tensor(q * 0.25, bits, group), bits), q * 0.25, rtol=0, atol=0)


def test_bad_group_size_and_bits_are_refused():
    with pytest.raises(UsageError, match="--group-size 5 is invalid"):
        quantize_tensor(torch.randn(4, 64), 4, 5)
    with pytest.raises(UsageError, match="3 bits is not supported"):
        quantize_tensor(torch.randn(4, 64), 3, 8)


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_quantised_grouped_path_equals_dequantise_then_reference(activation):
    bank = ExpertBank(6, 32, 64, activation)
    qbank = QuantizedExpertBank.from_bank(bank, [8, 4, 4, 2, 8, 4], group_size=16)
    ref = ExpertBank(6, 32, 64, activation)
    with torch.no_grad():
        for e in range(6):
            w_in, down = qbank.expert_weights(e)
            ref.w_in[e].copy_(w_in)
            ref.down_proj[e].copy_(down)
    counts_E = torch.tensor([5, 0, 3, 9, 0, 1])  # two experts without rows
    offsets_E = counts_E.cumsum(0).to(torch.int32)
    x_ND = torch.randn(int(counts_E.sum()), 32)
    with grouped.record() as ran:
        y_ND = qbank(x_ND, offsets_E)
    assert qbank.last_active == 4  # only the experts with rows were dequantised
    assert ran["forward", "kernel"] + ran["forward", "loop"] == 2  # both GEMMs went through the grouped facade
    torch.testing.assert_close(y_ND, ref(x_ND, offsets_E), rtol=1e-5, atol=1e-5)
    # and close to the original experts where the codes are fine: expert 0 (int8) owns the first 5 rows
    with torch.no_grad():
        y0 = bank(x_ND, offsets_E)[:5]
    assert float((y_ND[:5] - y0).norm() / y0.norm()) < 0.02


def test_quantised_model_runs_and_reports_bytes(tiny_lm, windows):
    model = tiny_lm()
    before = model(windows)
    result = quantize(model, "int8", group_size=16)
    after = model(windows)
    assert isinstance(moe_layers(model)[0].experts, QuantizedExpertBank)
    assert float((after - before).detach().abs().max()) < 0.05
    # int8 codes + fp32 scales every 16 weights = 1.25 bytes of 4
    assert result.bytes_after / result.bytes_before == pytest.approx(1.25 / 4)
    assert "int8 on 16 experts" in result.summary()


def test_mixed_precision_follows_importance_within_budget(tiny_lm, windows):
    model = tiny_lm()
    calib = calibrate(model, windows)
    for s in calib.layers:  # expert 0 of each layer is the busiest
        s.count_E[0] = s.count_E.sum()
        s.gate_sum_E[0] = s.count_E[0]
    bits = mixed_bits(calib, 3.0)
    flat = [b for row in bits for b in row]
    assert sum(flat) / len(flat) <= 3.0 and sum(flat) / len(flat) > 2.0
    assert all(row[0] == max(row) for row in bits)
    protected = {(1, 5)}
    assert mixed_bits(calib, 2.0, protected)[1][5] == 8


def test_super_experts_are_detected_and_protected(tiny_lm, windows):
    model = tiny_lm(n_layers=4)
    calib = calibrate(model, windows)
    calib.layers[1].max_abs_E[3] = 1e4  # one expert with an extreme outlier, early in the model
    calib.layers[3].max_abs_E[2] = 1e4  # one in the last quarter of the layers: not a super expert
    assert super_experts(calib) == [(1, 3)]
    result = quantize(model, "int4", calib=calib, group_size=16)
    assert result.bits[1][3] == 8 and result.bits[1][2] == 4 and result.bits[3][2] == 4
    assert "int8 on 1 experts" in result.summary() and "super experts" in result.summary()
