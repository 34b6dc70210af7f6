"""Offloading models whose expert rows are not 16-byte aligned (F = 1, 37, 129; D = 42): the store
round-trips the odd shapes, and offloaded forwards and generation equal the resident ones, which
run the grouped path's loop fallback for those GEMMs (issue 11, item 14)."""

from __future__ import annotations

import pytest
import torch

from moekit.config import MoEConfig, RouterConfig
from moekit.models.generate import generate
from moekit.models.lm import LMConfig, MoELM
from moekit.offload import ExpertStore, offload, offloaded_generate, write_store
from moekit.ops import grouped


def odd_lm(d_model: int, d_expert: int, dtype=torch.float32, activation="swiglu") -> MoELM:
    torch.manual_seed(0)
    n_heads = 3 if d_model % 4 else 4  # an even head dim for rotary embeddings
    cfg = LMConfig(vocab_size=256, d_model=d_model, n_layers=2, n_heads=n_heads, max_seq_len=128, init_std=0.2,
                   moe=MoEConfig(d_model=d_model, d_expert=d_expert, num_experts=4, activation=activation,
                                 router=RouterConfig(kind="topk", k=2)))
    return MoELM(cfg).to(dtype).eval()


@pytest.mark.parametrize("D,F,dtype,activation", [
    (32, 37, torch.float32, "swiglu"), (32, 1, torch.float32, "gelu"), (42, 129, torch.float32, "swiglu"),
    (32, 37, torch.bfloat16, "swiglu"),
])
def test_offloaded_forward_equals_resident_at_odd_widths(tmp_path, D, F, dtype, activation, monkeypatch):
    monkeypatch.setattr(grouped, "CPU_WX_MIN_WEIGHT_BYTES", 0)  # tiny experts: let the 5-token GEMMs run "loop_wx"
    model = odd_lm(D, F, dtype, activation)
    st = ExpertStore(write_store(model, tmp_path / "s"), verify="always")  # checksums on every read
    bank = model.moe_layers()[1].experts
    first = bank.gate_up_proj if activation == "swiglu" else bank.up_proj
    w_first, w_down = st.load(1, 3)
    assert torch.equal(w_first, first[3].detach()) and torch.equal(w_down, bank.down_proj[3].detach())
    for T in (5, 60):  # few rows per expert (loop everywhere) and many (the kernel where it can)
        ids = torch.randint(0, 256, (1, T), generator=torch.Generator().manual_seed(T))
        with torch.no_grad():
            with grouped.record() as ran:
                ref = model(ids)
            # resident: the GEMMs reading rows of width F fell back (to "loop_wx" at 5 tokens: 10 rows <= 4 x 4)
            assert ran["forward", "loop" if T == 60 or dtype != torch.float32 else "loop_wx"] > 0 and ran["forward", "kernel"] < 2 * 2, dict(ran)
            with offload(model, st, "50%", "lru"):
                out = model(ids)
        assert torch.equal(out, ref)


def test_offloaded_generation_equals_resident_at_f37():
    model = odd_lm(32, 37)
    prompt = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(1))
    ref = generate(model, prompt, 12)
    r = offloaded_generate(model, prompt, 12, "50%", "lru")
    assert torch.equal(r.ids_BT, ref)
    assert r.metrics["simulated"]["hit_flags_equal_measured"]
