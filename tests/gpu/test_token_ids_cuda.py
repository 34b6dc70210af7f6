"""The token id bounds check on CUDA (moekit.utils.ids): no device -> host synchronisation for ids in range,
the same hash routing as on CPU, and a device-side assert for an id out of range (in a subprocess: a failed
CUDA assert leaves the process's CUDA context unusable).

Marker `gpu`; MOEKIT_GPU_TEST_DEVICE=cpu dry-runs the test code on CPU (there the check raises at once).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import moekit
from moekit.config import MoEConfig, RouterConfig
from moekit.utils.ids import check_token_ids

DEVICE = os.environ.get("MOEKIT_GPU_TEST_DEVICE", "cuda")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(),
                                                  reason="needs a CUDA device (torch.cuda.is_available() is False)")]
V = 50


def test_in_range_ids_check_without_a_sync_and_route_as_on_cpu():
    ids = torch.randint(0, V, (64,), generator=torch.Generator().manual_seed(0))
    ids_dev = ids.to(DEVICE)
    if DEVICE == "cuda":
        torch.cuda.set_sync_debug_mode("error")  # any device -> host copy of the check raises
    try:
        check_token_ids(ids_dev, V, "t")
    finally:
        if DEVICE == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    torch.manual_seed(0)
    layer = moekit.MoELayer(MoEConfig(d_model=16, d_expert=8, num_experts=6,
                                      router=RouterConfig(kind="hash", k=2, vocab_size=V))).eval()
    x = torch.randn(64, 16)
    with torch.no_grad():
        layer(x, router_state=ids)
        cpu = layer.routing_info().route.to_padded()[0]
        layer.to(DEVICE)(x.to(DEVICE), router_state=ids_dev)
    assert torch.equal(layer.routing_info().route.to_padded()[0].cpu(), cpu)


@pytest.mark.parametrize("bad", [V, -1])
def test_an_out_of_range_id_fails_the_device_assert(bad):
    code = ("import torch; from moekit.utils.ids import check_token_ids; "
            f"check_token_ids(torch.tensor([1, {bad}], device={DEVICE!r}), {V}, 't'); "
            "torch.cuda.synchronize() if torch.cuda.is_available() else None")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert done.returncode != 0
    assert "device-side assert" in done.stderr or "out of range" in done.stderr, done.stderr[-2000:]
