"""Whether autograd is running a backward pass: the one place moekit reads a private PyTorch API.

Activation checkpointing recomputes a forward *inside* backward; code that must count each training
micro-batch once (moekit.train.balance) needs to tell those recomputes from real forwards. PyTorch has
no public call for this, so `in_backward` reads `torch._C._current_graph_task_id()` (-1 outside a
backward). If a PyTorch release removes it, importing this module raises at once (and
tests/utils/test_autograd.py fails) rather than counting silently wrong.
"""

from __future__ import annotations

import torch

try:
    _current_graph_task_id = torch._C._current_graph_task_id
except AttributeError as e:  # pragma: no cover - only with a PyTorch that removed it
    raise ImportError("moekit needs torch._C._current_graph_task_id to tell activation-checkpoint recomputes "
                      f"from forwards, and torch {torch.__version__} has none") from e


def in_backward() -> bool:
    """True while autograd runs a backward pass (where activation checkpointing recomputes)."""
    return _current_graph_task_id() != -1
