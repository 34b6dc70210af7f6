import pytest
import torch

import moekit
from moekit.compress import calibrate, prune
from moekit.compress.prune import apply_keep, choose_experts, expert_scores
from moekit.errors import UsageError
from moekit.layers.moe import moe_layers
from moekit.models import MoELM


def _layer_io(model, ids):
    """Each MoE layer's input and output on `ids`."""
    seen = {}
    hooks = [m.register_forward_hook(lambda m, a, y, i=i: seen.__setitem__(i, (a[0].detach(), y.detach())))
             for i, m in enumerate(moe_layers(model))]
    model(ids)
    for h in hooks:
        h.remove()
    return seen


def test_pruning_nothing_is_the_identity(tiny_lm, windows):
    model = tiny_lm()
    before = model(windows)
    calib = calibrate(model, windows)
    result = prune(model, calib, 0.0, criterion="reap")
    assert result.kept == [list(range(8))] * 2
    assert model.cfg.moe_num_experts is None
    torch.testing.assert_close(model(windows), before, rtol=0, atol=0)
    assert result.summary().startswith("pruned 0 of 16 experts in 0 of 2 layers")


@pytest.mark.parametrize("normalize", [True, False])
def test_kept_tokens_keep_their_output_up_to_renormalisation(tiny_lm, windows, normalize):
    model = tiny_lm(normalize=normalize)
    layer = moe_layers(model)[0]
    x_TD = torch.randn(64, 32)
    y_TD = layer(x_TD)
    route = layer.routing_info().route
    probs_TE = route.scores_TE
    keep = [0, 2, 3, 5, 6]
    apply_keep(layer, keep)
    assert layer.router.num_experts == 5 and layer.experts.num_experts == 5
    y_new_TD = layer(x_TD)
    kept_E = torch.zeros(8, dtype=torch.bool)
    kept_E[keep] = True
    survives_T = torch.ones(64, dtype=torch.bool)
    survives_T[route.token_idx_N[~kept_E[route.expert_idx_N]]] = False
    assert 0 < int(survives_T.sum()) < 64
    if normalize:  # renormalised top-k: identical weights, identical output
        expected_TD = y_TD
    else:  # raw softmax: weights p_e / (surviving mass)
        expected_TD = y_TD / probs_TE[:, kept_E].sum(-1, keepdim=True)
    torch.testing.assert_close(y_new_TD[survives_T], expected_TD[survives_T], rtol=1e-5, atol=1e-6)


def test_router_rows_and_selection_bias_go_with_the_experts(tiny_lm):
    model = tiny_lm(score="sigmoid", bias_update_rate=1e-3)
    layer = moe_layers(model)[0]
    layer.router.e_score_correction_bias.copy_(torch.arange(8.0))
    w = layer.router.weight.detach().clone()
    down = layer.experts.down_proj.detach().clone()
    apply_keep(layer, [1, 4, 7])
    torch.testing.assert_close(layer.router.weight.detach(), w[[1, 4, 7]])
    torch.testing.assert_close(layer.router.e_score_correction_bias, torch.tensor([1.0, 4.0, 7.0]))
    torch.testing.assert_close(layer.experts.down_proj.detach(), down[[1, 4, 7]])


def test_per_layer_budget_gives_layers_different_counts(tiny_lm, windows):
    model = tiny_lm()
    scores = [torch.tensor([8., 1, 1, 1, 1, 1, 1, 1]), torch.tensor([1., 1, 1, 1, 1, 1, 1, 1])]
    kept = choose_experts(model, scores, 0.5, per_layer=True)
    assert sum(map(len, kept)) == 8 and len(kept[0]) != len(kept[1])
    assert 0 in kept[0]
    uniform = choose_experts(model, scores, 0.5, per_layer=False)
    assert list(map(len, uniform)) == [4, 4]
    # the router's floor: top-2 needs 2 experts
    assert all(len(k) >= 2 for k in choose_experts(model, scores, 0.95, per_layer=True))


def test_pruned_model_saves_counts_reloads_and_trains(tiny_lm, windows):
    model = tiny_lm()
    calib = calibrate(model, windows)
    scores = expert_scores(calib, "freq")
    assert [s.numel() for s in scores] == [8, 8]
    result = prune(model, calib, 0.5, criterion="freq", per_layer=True)
    counts = [len(k) for k in result.kept]
    assert model.cfg.moe_num_experts in (None, counts)
    cfg = type(model.cfg).from_dict(model.cfg.to_dict())
    twin = MoELM(cfg)
    twin.load_state_dict(model.state_dict())
    torch.testing.assert_close(twin.eval()(windows), model(windows))
    assert cfg.num_params() == sum(p.numel() for p in twin.parameters())
    model.train()
    loss = torch.nn.functional.cross_entropy(model(windows).flatten(0, 1), windows.roll(-1, 1).flatten())
    loss.backward()
    assert all(p.grad is not None for p in moe_layers(model)[0].experts.parameters())


def test_group_limited_routing_keeps_whole_groups(tiny_lm, windows):
    model = tiny_lm(k=2, score="sigmoid", n_group=4, topk_group=2)
    calib = calibrate(model, windows)
    result = prune(model, calib, 0.5, criterion="reap", per_layer=True)
    for kept in result.kept:
        assert len(kept) % 4 == 0
        groups = torch.tensor(kept) // 2
        assert torch.bincount(groups, minlength=4).unique().numel() == 1
    model(windows)


def test_bad_ratio_and_criterion_are_one_line_errors(tiny_lm, windows):
    model = tiny_lm()
    calib = calibrate(model, windows)
    with pytest.raises(UsageError, match="--prune 1.5 is invalid"):
        prune(model, calib, 1.5)
    with pytest.raises(UsageError, match="--criterion 'size' is invalid"):
        prune(model, calib, 0.5, criterion="size")


def test_task_criterion_keeps_the_experts_the_task_selects(tiny_lm, windows):
    model = tiny_lm()
    layer = moe_layers(model)[0]
    with torch.no_grad():
        layer.router.weight[3] += 5 * layer.router.weight[3].sign()  # expert 3 wins most tokens
    calib = calibrate(model, windows)
    result = prune(model, calib, 0.75, criterion="task")
    assert 3 in result.kept[0]
    assert moekit.MoELayer  # the pruned model still runs
    model(windows)


def test_a_model_with_different_counts_per_layer_traces(tiny_lm, windows):
    from moekit.analysis.trace import TraceRecorder

    model = tiny_lm()
    calib = calibrate(model, windows)
    for layer, keep in zip(moe_layers(model), ([0, 1, 2], [0, 1, 2, 3, 4, 5]), strict=True):
        apply_keep(layer, keep)
    with TraceRecorder(model, gate_lookahead=1) as rec:
        model(windows[:2])
    trace = rec.to_trace()
    assert trace.num_experts == 6 and trace.meta["experts_per_layer"] == [3, 6]
    assert int(trace.seqs[0][0].max()) < 3  # layer 0's ids lie below its own count
    assert calib.tokens == windows.numel()
