"""make_plan against its plain definition: assignments grouped by expert, in their original order within an
expert (a stable sort), int32 end offsets, int64 counts; RouterOutput.detached without and with autograd."""

import torch

from moekit.dispatch import make_plan
from moekit.routers import RouterOutput


def test_plan_is_the_stable_grouping_by_expert():
    g = torch.Generator().manual_seed(0)
    expert = torch.randint(0, 5, (40,), generator=g)  # many ties: the order within an expert matters
    token = torch.arange(40).flip(0)
    weight = torch.rand(40, generator=g)
    plan = make_plan(token, expert, weight, 6)  # expert 5 gets nothing
    order = sorted(range(40), key=lambda n: (int(expert[n]), n))  # plain stable grouping
    assert plan.token_N.tolist() == [int(token[n]) for n in order]
    assert plan.expert_N.tolist() == [int(expert[n]) for n in order]
    torch.testing.assert_close(plan.weight_N, weight[order], rtol=0, atol=0)
    counts = [int((expert == e).sum()) for e in range(6)]
    assert plan.counts_E.dtype == torch.int64 and plan.counts_E.tolist() == counts
    assert plan.offsets_E.dtype == torch.int32 and plan.offsets_E.tolist() == torch.tensor(counts).cumsum(0).tolist()
    assert plan.num_dropped == 0


def test_detached_route_is_itself_without_autograd_history_and_a_detached_copy_with_it():
    logits = torch.randn(3, 4, requires_grad=True)
    scores = logits.softmax(-1)
    w_TK, idx_TK = scores.topk(2, dim=-1)
    route = RouterOutput.from_topk(idx_TK, w_TK, scores, logits)
    copy = route.detached()
    assert copy is not route
    assert not (copy.weight_N.requires_grad or copy.scores_TE.requires_grad or copy.logits_TE.requires_grad)
    torch.testing.assert_close(copy.weight_N, route.weight_N.detach(), rtol=0, atol=0)
    with torch.no_grad():  # inference: nothing to detach, the (immutable) route is kept as it is
        plain = RouterOutput.from_topk(idx_TK, scores.gather(1, idx_TK), scores.detach(), logits.detach())
    assert plain.detached() is plain
