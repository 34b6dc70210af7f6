"""Global-batch balance (arXiv 2501.11873): f over the step's micro-batches and data-parallel ranks."""

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
    layer.after_optimizer_step()
    for x in xs:
        micro_loss(layer, x)
    mean_global = sum(losses.global_load_balance_loss(
        layer.router(x).scores_TE, layer._global_f_E) for x in xs) / 3
    torch.testing.assert_close(mean_global, concatenated(layer, [xcat]))


def test_reset_each_step_and_gradient_reaches_router(make_cfg):
    layer = MoELayer(make_cfg(balance_scope="global"))
    x1, x2 = torch.randn(16, 32), torch.randn(16, 32)
    micro_loss(layer, x1)
    assert int(layer.global_tokens) == 16
    layer.after_optimizer_step()
    assert int(layer.global_tokens) == 0 and int(layer.global_counts_E.sum()) == 0
    loss = micro_loss(layer, x2)
    torch.testing.assert_close(loss, concatenated(layer, [x2]))
    loss.backward()
    assert layer.router.weight.grad.abs().sum() > 0


def test_eval_and_checkpoint_recompute_do_not_accumulate(make_cfg):
    layer = MoELayer(make_cfg(balance_scope="global"))
    x = torch.randn(16, 32, requires_grad=True)
    layer.eval()
    layer(x)
    assert int(layer.global_tokens) == 0
    layer.train()
    y = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False)
    (y.sum() + layer.routing_info().aux["load_balance"]).backward()
    assert int(layer.global_tokens) == 16


def test_padding_is_excluded(make_cfg):
    layer = MoELayer(make_cfg(balance_scope="global"))
    x = torch.randn(2, 8, 32)
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[1, 5:] = False
    layer(x, padding_mask=mask)
    assert int(layer.global_tokens) == 13


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, state, xs, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        cfg = moekit.MoEConfig(d_model=32, d_expert=64, num_experts=8, balance_scope="global")
        layer = MoELayer(cfg)
        layer.load_state_dict(state)
        losses_j = [micro_loss(layer, x) for x in xs[rank]]
        out[rank] = torch.stack(losses_j).detach()
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_equal_the_concatenated_batch():
    layer = MoELayer(moekit.MoEConfig(d_model=32, d_expert=64, num_experts=8, balance_scope="global"))
    xs = [[torch.randn(12, 32) for _ in range(2)] for _ in range(2)]  # rank x micro-batch
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_worker, args=(2, _free_port(), layer.state_dict(), xs, out), nprocs=2, join=True)
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
