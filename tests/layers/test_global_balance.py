"""Global-batch balance (arXiv 2501.11873): f over the step's micro-batches and data-parallel ranks,
kept by moekit.train.balance.BalanceTracker (the layer calls no collective)."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import moekit
from moekit import MoELayer, losses


def micro_loss(layer, x):
    layer(x)
    return layer.routing_info().aux["load_balance"]


def concatenated(layer, xs):
    """f from the concatenated batch, evaluated with the last micro-batch's P (no state touched)."""
    with torch.no_grad():
        layer(torch.cat(xs))
        counts_E = layer.routing_info().counts_E
        layer(xs[-1])
        scores_TE = layer.routing_info().route.scores_TE
    return losses.load_balance_loss(scores_TE, counts_E, sum(x.shape[0] for x in xs))


def test_last_micro_batch_uses_the_whole_steps_frequencies(make_cfg):
    layer = MoELayer(make_cfg(balance_scope="global", num_experts=8))
    tracker = moekit.BalanceTracker(layer)
    xs = [torch.randn(24, 32) for _ in range(3)]
    expected = [concatenated(layer, xs[: j + 1]) for j in range(3)]
    got = [micro_loss(layer, x) for x in xs]
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e)
    # the micro-batch scope differs once micro-batches route differently
    local = MoELayer(make_cfg(num_experts=8))
    local.load_state_dict(layer.state_dict())
    assert not torch.allclose(micro_loss(local, xs[2]), got[2])
    # the loss of the concatenated batch = mean over equal micro-batches with the global f
    xcat = torch.cat(xs)
    tracker.step()
    for x in xs:
        micro_loss(layer, x)
    mean_global = sum(losses.global_load_balance_loss(
        layer.router(x).scores_TE, tracker.last_global_f(layer)) for x in xs) / 3
    torch.testing.assert_close(mean_global, concatenated(layer, [xcat]))


def test_reset_each_step_and_gradient_reaches_router(make_cfg):
    layer = MoELayer(make_cfg(balance_scope="global"))
    tracker = moekit.BalanceTracker(layer)
    x1, x2 = torch.randn(16, 32), torch.randn(16, 32)
    micro_loss(layer, x1)
    assert tracker.global_counts(layer)[1] == 16
    tracker.step()
    counts_E, tokens = tracker.global_counts(layer)
    assert tokens == 0 and int(counts_E.sum()) == 0
    loss = micro_loss(layer, x2)
    torch.testing.assert_close(loss, concatenated(layer, [x2]))
    loss.backward()
    assert layer.router.weight.grad.abs().sum() > 0


def test_eval_and_checkpoint_recompute_do_not_accumulate(make_cfg):
    layer = MoELayer(make_cfg(balance_scope="global"))
    tracker = moekit.BalanceTracker(layer)
    x = torch.randn(16, 32, requires_grad=True)
    layer.eval()
    layer(x)
    assert tracker.global_counts(layer)[1] == 0
    layer.train()
    y = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False)
    (y.sum() + layer.routing_info().aux["load_balance"]).backward()
    assert tracker.global_counts(layer)[1] == 16


def test_padding_is_excluded(make_cfg):
    layer = MoELayer(make_cfg(balance_scope="global"))
    tracker = moekit.BalanceTracker(layer)
    x = torch.randn(2, 8, 32)
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[1, 5:] = False
    layer(x, padding_mask=mask)
    assert tracker.global_counts(layer)[1] == 13


def test_training_without_a_tracker_is_a_clear_error(make_cfg):
    layer = MoELayer(make_cfg(balance_scope="global"))
    with pytest.raises(ValueError, match=r"balance_scope='global' .*moekit.BalanceTracker"):
        layer(torch.randn(4, 32))
    layer.eval()(torch.randn(4, 32))  # evaluation needs none: f of the batch itself


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


BIASED = dict(d_model=32, d_expert=64, num_experts=8,
              router=moekit.RouterConfig(k=2, score="sigmoid", bias_update_rate=1e-3))


def _worker(rank, world, port, state, xs, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        cfg = moekit.MoEConfig(d_model=32, d_expert=64, num_experts=8, balance_scope="global")
        layer = MoELayer(cfg)
        layer.load_state_dict(state)
        moekit.BalanceTracker(layer, group=dist.group.WORLD)
        out[rank] = torch.stack([micro_loss(layer, x) for x in xs[rank]]).detach()
        # A tracker without a group reduces nothing: the layer itself never uses the default group.
        local = MoELayer(cfg)
        local.load_state_dict(state)
        moekit.BalanceTracker(local)
        out["local", rank] = torch.stack([micro_loss(local, x) for x in xs[rank]]).detach()
        # The step's counts: one all-reduce over the given group, so every rank updates the same bias.
        biased = MoELayer(moekit.MoEConfig(**BIASED))
        biased.load_state_dict(out["biased_state"])
        tracker = moekit.BalanceTracker(biased, group=dist.group.WORLD)
        for x in xs[rank]:
            biased(x)
        tracker.step()
        out["bias", rank] = biased.router.e_score_correction_bias.clone()
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_equal_the_concatenated_batch():
    layer = MoELayer(moekit.MoEConfig(d_model=32, d_expert=64, num_experts=8, balance_scope="global"))
    biased = MoELayer(moekit.MoEConfig(**BIASED))
    xs = [[torch.randn(12, 32) for _ in range(2)] for _ in range(2)]  # rank x micro-batch
    manager = mp.Manager()
    out = manager.dict()
    out["biased_state"] = biased.state_dict()
    # fork: the workers start in a fraction of spawn's time (no re-import of torch)
    mp.start_processes(_worker, args=(2, _free_port(), layer.state_dict(), xs, out), nprocs=2, join=True,
                       start_method="fork")
    # every rank's bias comes from the counts of all four micro-batches
    tracker = moekit.BalanceTracker(biased)
    for x in [x for rank_xs in xs for x in rank_xs]:
        biased(x)
    tracker.step()
    assert biased.router.e_score_correction_bias.abs().sum() > 0
    for rank in range(2):
        torch.testing.assert_close(out["bias", rank], biased.router.e_score_correction_bias)
    for rank in range(2):
        with torch.no_grad():  # a tracker without a group: f over this rank's micro-batches only
            layer(torch.cat(xs[rank]))
            counts_E = layer.routing_info().counts_E
            layer(xs[rank][1])
            scores_TE = layer.routing_info().route.scores_TE
        torch.testing.assert_close(out["local", rank][1], losses.load_balance_loss(scores_TE, counts_E, 24))
    for rank in range(2):
        for j in range(2):
            # micro-batch j on any rank sees micro-batches 1..j of *every* rank; P stays local
            seen = [xs[r][i] for i in range(j + 1) for r in range(2)]
            with torch.no_grad():
                layer(torch.cat(seen))
                counts_E = layer.routing_info().counts_E
                layer(xs[rank][j])
                scores_TE = layer.routing_info().route.scores_TE
            expected = losses.load_balance_loss(scores_TE, counts_E, 12 * len(seen))
            torch.testing.assert_close(out[rank][j], expected)


def test_bad_scope_is_named(make_cfg):
    with pytest.raises(ValueError, match="balance_scope"):
        make_cfg(balance_scope="batch").validate()
