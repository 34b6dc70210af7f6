"""With capacity dropping, an offloaded run's trace holds the executed assignments (it used to hold
the router's choice, dropped assignments included), and the re-simulation from it still equals the
measured cache hit for hit (capacity leaves every chosen expert at least one row, so the experts a
step requests are the same either way)."""

from __future__ import annotations

import dataclasses

import torch

from moekit.models.lm import MoELM
from moekit.offload import offloaded_generate

from .conftest import tiny_lm


def test_simulation_equals_measurement_with_capacity_dropping():
    base = tiny_lm()
    cfg = dataclasses.replace(base.cfg, moe=dataclasses.replace(base.cfg.moe, capacity_factor=0.5, eval_capacity_factor=0.5))
    model = MoELM(cfg).eval()
    model.load_state_dict(base.state_dict())
    prompt = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        model(prompt)
    dropped = sum(layer.routing_info().num_dropped for layer in model.moe_layers())
    r = offloaded_generate(model, prompt, 6, "50%", "lru")
    assert r.metrics["simulated"]["hit_flags_equal_measured"] is True
    assert dropped  # eval_capacity_factor drops: the trace must hold fewer assignments than the router chose
    assert sum(int((s >= 0).sum()) for s in r.trace.seqs[:2]) < 2 * 12 * 3 * 2
