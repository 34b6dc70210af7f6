"""`moekit.moe_layers(model)`: the one way to list a model's MoE layers, and no other copy of it."""

import re
from pathlib import Path

import torch
from torch import nn

import moekit
from moekit.layers.moe import moe_layer_names
from moekit.models import LMConfig, MoELM

SRC = Path(__file__).resolve().parents[2] / "src" / "moekit"


def test_module_order_names_and_every_entry_point_agree(make_cfg):
    cfg = LMConfig(vocab_size=50, d_model=32, n_layers=3, n_heads=4, max_seq_len=16, n_dense=1,
                   moe=make_cfg(num_experts=4, k=2))
    model = MoELM(cfg)
    layers = moekit.moe_layers(model)
    assert [id(m) for m in layers] == [id(b.ffn) for b in model.layers if b.is_moe] and len(layers) == 2
    assert [id(m) for m in model.moe_layers()] == [id(m) for m in layers]
    assert moe_layer_names(model) == ["layers.1.ffn", "layers.2.ffn"]
    from moekit.layers.overrides import moe_layers as old_path  # where it used to be defined

    assert old_path is moekit.moe_layers


def test_a_bare_layer_and_a_container(make_cfg):
    layer = moekit.MoELayer(make_cfg())
    assert moekit.moe_layers(layer) == [layer] and moe_layer_names(layer) == ["MoELayer"]
    seq = nn.Sequential(nn.Linear(32, 32), moekit.MoELayer(make_cfg()), nn.Sequential(moekit.MoELayer(make_cfg())))
    assert moekit.moe_layers(seq) == [seq[1], seq[2][0]] and moe_layer_names(seq) == ["1", "2.0"]
    assert moekit.moe_layers(nn.Linear(2, 2)) == []
    seq(torch.randn(3, 32))  # the layers found are the ones that run


def test_no_other_place_lists_the_moe_layers():
    # A second copy filters modules by isinstance(MoELayer) itself, or asks a model for its own list.
    copy = re.compile(r"modules\(\).*isinstance\(\w+, MoELayer\)|hasattr\(\w+, [\"']moe_layers[\"']\)")
    found = [f"{p.relative_to(SRC)}:{i}: {line.strip()}" for p in sorted(SRC.rglob("*.py"))
             for i, line in enumerate(p.read_text().splitlines(), 1)
             if copy.search(line) and p.relative_to(SRC).as_posix() != "layers/moe.py"]
    assert not found, "use moekit.moe_layers(model):\n" + "\n".join(found)
