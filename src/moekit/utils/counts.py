"""count_ids: how often each id occurs, as a fixed-length tensor.

`torch.bincount` sizes its output by the largest id, which it must read: a device->host sync per call
on a GPU, and a data-dependent shape that torch.compile / torch.export cannot trace. A scatter-add
into `size` zeros computes the same counts for ids in [0, size) with neither.
"""

from __future__ import annotations

import torch


def count_ids(ids_N: torch.Tensor, size: int) -> torch.Tensor:
    """(size,) int64 counts of the int64 ids_N (N,), each in [0, size) (not checked: that would sync)."""
    return torch.zeros(size, dtype=torch.int64, device=ids_N.device).scatter_add_(
        0, ids_N, torch.ones_like(ids_N, dtype=torch.int64))
