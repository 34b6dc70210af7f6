"""What a compression did, as a versioned JSON record saved with the model, and how to rebuild the
model's structure from it before its weights are loaded.

    {"format": "moekit-compression", "version": 1, "source": "...", "calibration": {...},
     "steps": [{"method": "prune", ...}, {"method": "merge", ...}, {"method": "quantize", ...}]}

Pruning needs nothing for a moekit model (its config's expert counts say it); a wrapped transformers
model is built with its config's one count (`before`) and pruned to `kept` here; merging replaces each layer's
bank by one of M experts plus `expert_map_E`; quantising replaces it by a `QuantizedExpertBank` with
each expert's bit width. Steps are replayed in order.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from moekit.compress.prune import apply_keep
from moekit.compress.quantize import QuantizedExpertBank
from moekit.errors import DataError
from moekit.experts import ExpertBank
from moekit.layers.moe import moe_layers

__all__ = ["FORMAT", "VERSION", "new_record", "restore"]

FORMAT = "moekit-compression"
VERSION = 1


def new_record(source: str, calibration: dict | None = None) -> dict[str, Any]:
    return {"format": FORMAT, "version": VERSION, "source": source, "calibration": calibration, "steps": []}


def restore(model: nn.Module, record: dict[str, Any]) -> nn.Module:
    """Give a freshly built `model` the structure `record` describes (weights are loaded afterwards).
    Raises DataError for a record of another format, a newer version or one that does not fit the model."""
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise DataError(f"the compression record is not a {FORMAT} record")
    if record.get("version", 0) > VERSION:
        raise DataError(f"the compression record has version {record['version']}, newer than this moekit "
                        f"understands ({VERSION})")
    layers = moe_layers(model)
    for step in record["steps"]:
        method = step.get("method")
        if method == "prune":
            got = [m.router.num_experts for m in layers]
            kept = [len(k) for k in step["kept"]]
            if got == step["before"] and got != kept:  # a wrapped transformers model: built with its config's count
                for layer, keep in zip(layers, step["kept"], strict=True):
                    apply_keep(layer, keep)
            elif got != kept:
                raise DataError(f"the compression record's pruning kept {kept} experts per layer; the model config "
                                f"has {got}")
        elif method == "merge":
            for layer, groups in zip(layers, step["groups"], strict=True):
                bank = layer.experts
                layer.experts = ExpertBank(len(groups), bank.d_model, bank.d_expert, bank.activation).to(bank.down_proj)
                layer.expert_map_E = torch.zeros(layer.router.num_experts, dtype=torch.long)
        elif method == "quantize":
            for layer, bits_E in zip(layers, step["bits"], strict=True):
                bank = layer.experts
                layer.experts = QuantizedExpertBank(bank.num_experts, bank.d_model, bank.d_expert, bank.activation,
                                                    bits_E, step["group_size"])
        else:
            raise DataError(f"the compression record has an unknown step {method!r}")
    return model
