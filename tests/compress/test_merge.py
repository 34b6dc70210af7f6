import itertools

import numpy as np
import pytest
import torch

from moekit.compress import calibrate
from moekit.compress.merge import hc_smoe_groups, m_smoe_groups, merge, merge_groups
from moekit.layers.moe import moe_layers
from moekit.models import MoELM
from moekit.utils.assign import assign_min_cost


def test_the_neuron_assignment_is_optimal():
    rng = np.random.default_rng(0)
    for n in (1, 2, 5, 6):
        cost = rng.normal(size=(n, n))
        p = assign_min_cost(cost)
        best = min(sum(cost[i, q[i]] for i in range(n)) for q in itertools.permutations(range(n)))
        assert sorted(p.tolist()) == list(range(n))
        assert sum(cost[i, p[i]] for i in range(n)) == pytest.approx(best)


@pytest.mark.parametrize("align", [False, True])
def test_merging_two_identical_experts_is_exact(tiny_lm, align):
    model = tiny_lm()
    layer = moe_layers(model)[0]
    with torch.no_grad():
        layer.experts.gate_up_proj[1].copy_(layer.experts.gate_up_proj[0])
        layer.experts.down_proj[1].copy_(layer.experts.down_proj[0])
    x_TD = torch.randn(64, 32)
    y_TD = layer(x_TD)
    groups = [[0, 1]] + [[e] for e in range(2, 8)]
    merge_groups(layer, groups, torch.tensor([0.3, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]), align=align)
    assert layer.experts.num_experts == 7 and layer.expert_map_E.tolist() == [0, 0, 1, 2, 3, 4, 5, 6]
    torch.testing.assert_close(layer(x_TD), y_TD, rtol=1e-6, atol=1e-6)


def test_permutation_alignment_recovers_a_permuted_copy(tiny_lm):
    model = tiny_lm()
    layer = moe_layers(model)[0]
    F = layer.cfg.d_expert
    perm = torch.randperm(F)
    with torch.no_grad():
        gu = layer.experts.gate_up_proj[0]
        layer.experts.gate_up_proj[3].copy_(torch.cat([gu[:F][perm], gu[F:][perm]]))
        layer.experts.down_proj[3].copy_(layer.experts.down_proj[0][:, perm])
    x_TD = torch.randn(64, 32)
    y_TD = layer(x_TD)
    groups = [[0, 3], [1], [2], [4], [5], [6], [7]]
    merge_groups(layer, groups, torch.ones(8), align=True)
    torch.testing.assert_close(layer(x_TD), y_TD, rtol=1e-5, atol=1e-6)


def test_grouping_rules():
    freq = torch.tensor([0.5, 0.1, 0.3, 0.1])
    sim = torch.eye(4)
    sim[1, 2] = sim[2, 1] = 0.9
    sim[3, 0] = sim[0, 3] = 0.8
    assert m_smoe_groups(freq, sim, 2) == [[0, 3], [2, 1]]
    feats = torch.tensor([[1.0, 0], [0.9, 0.1], [0, 1.0], [0.1, 1.0]])
    assert hc_smoe_groups(feats, freq, 2) == [[0, 1], [2, 3]]


@pytest.mark.parametrize("method", ["m-smoe", "hc-smoe"])
def test_merged_model_runs_reports_errors_and_reloads(tiny_lm, windows, method):
    model = tiny_lm()
    calib = calibrate(model, windows, outputs=method == "hc-smoe")
    result = merge(model, calib, 0.5, method=method)
    assert [len(g) for g in result.groups] == [4, 4]
    assert all(0 < e < 1.5 for e in result.error_L)
    assert "merged 16 experts into 8" in result.summary()
    # merging nothing reports zero error
    twin = tiny_lm()
    assert merge(twin, calibrate(twin, windows, outputs=True), 0.0, method=method).error_L == [0.0, 0.0]
    out = model(windows)
    assert out.isfinite().all()
    assert isinstance(model, MoELM)
