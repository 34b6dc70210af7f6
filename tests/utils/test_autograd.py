"""`in_backward` (the one private PyTorch API moekit reads) says where autograd is, and fails loudly if the
API it reads disappears."""

import torch

from moekit.utils import autograd


def test_torch_still_has_the_private_api_moekit_reads():
    # If this fails, a PyTorch release removed torch._C._current_graph_task_id: moekit.utils.autograd
    # must find another way to tell activation-checkpoint recomputes from forwards.
    assert callable(getattr(torch._C, "_current_graph_task_id", None))


def test_in_backward_is_true_only_inside_a_backward_pass():
    seen = []

    class Probe(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            seen.append(("forward", autograd.in_backward()))
            return x * 2

        @staticmethod
        def backward(ctx, g):
            seen.append(("backward", autograd.in_backward()))
            return g * 2

    x = torch.ones(3, requires_grad=True)
    assert not autograd.in_backward()
    Probe.apply(x).sum().backward()
    assert seen == [("forward", False), ("backward", True)]
    assert not autograd.in_backward()


def test_non_reentrant_checkpoint_recomputes_inside_backward():
    calls = []

    def f(x):
        calls.append(autograd.in_backward())
        return x.sin()

    x = torch.ones(3, requires_grad=True)
    torch.utils.checkpoint.checkpoint(f, x, use_reentrant=False).sum().backward()
    assert calls == [False, True]
