"""Fixtures of the CUDA tests (marker `gpu`, excluded from the default suite; see scripts/gpu_check.sh)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _no_tf32():
    """fp32 means fp32: TF32 matmuls (10-bit mantissa) would put CUDA ~1e-3 away from CPU."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
