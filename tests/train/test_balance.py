"""moekit.train.balance: the optimiser-step routing state lives in a BalanceTracker, not in the model."""

import copy
import pickle

import pytest
import torch
from torch import nn

import moekit
from moekit.train.balance import BalanceTracker


def biased_model(n_layers=2):
    cfg = moekit.MoEConfig(d_model=16, d_expert=8, num_experts=4,
                           router=moekit.RouterConfig(k=2, score="sigmoid", bias_update_rate=1e-2))
    return nn.Sequential(*[moekit.MoELayer(cfg) for _ in range(n_layers)])


def test_the_step_hook_updates_routers_inside_optimizer_step():
    model = biased_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    tracker = BalanceTracker(model).attach(opt)
    model(torch.randn(12, 16)).sum().backward()
    counts = [tracker.counts(layer) for layer in model]
    assert [c.tokens for c in counts] == [12, 12] and all(int(c.executed_E.sum()) == 24 for c in counts)
    assert not any(layer.router.e_score_correction_bias.any() for layer in model)
    opt.step()  # the hook runs the update, once
    biases = [layer.router.e_score_correction_bias.clone() for layer in model]
    assert all(b.abs().sum() > 0 for b in biases)
    assert tracker.counts(model[0]).tokens == 0  # reset for the next step
    moekit.after_optimizer_step(model)  # an attached tracker already ran: nothing more happens
    assert all(torch.equal(b, layer.router.e_score_correction_bias) for b, layer in zip(biases, model, strict=True))
    tracker.detach()
    assert model[0].balance_tracker is None
    opt.step()
    assert all(torch.equal(b, layer.router.e_score_correction_bias) for b, layer in zip(biases, model, strict=True))


def test_the_model_holds_no_step_state():
    model = biased_model(1)
    BalanceTracker(model)
    model(torch.randn(12, 16))
    assert not [n for n, _ in model.named_buffers() if "count" in n or "token" in n]
    assert set(model.state_dict()) == {n for n, _ in model.named_parameters()} | {"0.router.e_score_correction_bias"}


def test_by_hand_without_a_tracker_starts_one_and_says_so():
    model = biased_model(1)
    model(torch.randn(12, 16))
    with pytest.warns(UserWarning, match="no BalanceTracker during this step"):
        moekit.after_optimizer_step(model)
    assert not model[0].router.e_score_correction_bias.any()  # nothing was counted in that first step
    tracker = model[0].balance_tracker
    assert isinstance(tracker, BalanceTracker) and not tracker.attached
    model(torch.randn(12, 16))
    moekit.after_optimizer_step(model)  # from now on, every step counts
    assert model[0].router.e_score_correction_bias.abs().sum() > 0


def test_a_layer_has_one_tracker_and_copies_are_untracked():
    model = biased_model(1)
    tracker = BalanceTracker(model)
    with pytest.raises(ValueError, match="already tracked"):
        BalanceTracker(model)
    assert copy.deepcopy(model)[0].balance_tracker is None
    assert pickle.loads(pickle.dumps(model))[0].balance_tracker is None
    assert model[0].balance_tracker is tracker
    with pytest.raises(ValueError, match="contains no MoELayer"):
        BalanceTracker(nn.Linear(2, 2))


def test_routers_of_one_class_update_together_in_layer_order(monkeypatch):
    model = biased_model(3)
    tracker = BalanceTracker(model)
    calls = []
    cls = type(model[0].router)
    monkeypatch.setattr(cls, "after_optimizer_step_all",
                        classmethod(lambda c, routers, counts: calls.append((routers, [x.tokens for x in counts]))))
    model(torch.randn(5, 16))
    tracker.step()
    assert calls == [([layer.router for layer in model], [5, 5, 5])]


def test_every_collective_goes_over_the_given_group_only(monkeypatch):
    """Global-batch f (one per layer per counted micro-batch) and the step's stacked counts (one per step)
    are summed over the tracker's group, never the default one, whatever the accumulation."""
    groups = []
    monkeypatch.setattr(torch.distributed, "all_reduce",
                        lambda tensor, op=None, group=None, async_op=False: groups.append(group))
    given = object()  # stands for a data-parallel subgroup: any use of the default group shows as None
    cfg = moekit.MoEConfig(d_model=16, d_expert=8, num_experts=4, balance_scope="global",
                           router=moekit.RouterConfig(k=2, score="sigmoid", bias_update_rate=1e-2))
    model = nn.Sequential(*[moekit.MoELayer(cfg) for _ in range(2)])
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    tracker = BalanceTracker(model, group=given).attach(opt)
    calls = []
    monkeypatch.setattr(BalanceTracker, "step", lambda self, _step=BalanceTracker.step: calls.append(1) or _step(self))
    tracker.attach(opt)  # re-attached: the hook replaces the first, it does not add a second
    for _ in range(3):  # gradient accumulation: three micro-batches, one optimiser step
        model(torch.randn(5, 16)).sum().backward()
    opt.step()
    moekit.after_optimizer_step(model)  # by hand as well: the attached tracker already ran
    assert calls == [1]
    assert groups == [given] * (3 * 2 + 1)  # 3 micro-batches x 2 layers of f, then ONE stacked sum
