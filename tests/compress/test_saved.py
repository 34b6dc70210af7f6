import json

import pytest
import torch

from moekit.compress import calibrate, merge, new_record, prune, quantize
from moekit.compress.prune import apply_keep, record_counts
from moekit.errors import DataError
from moekit.hf.export import ExportError, export_hf
from moekit.layers.moe import moe_layers
from moekit.train import TrainConfig, load_trained, save_trained
from moekit.train.checkpoint import read_json


@pytest.mark.parametrize("steps", [("prune",), ("prune", "merge", "quantize"), ("merge",), ("quantize",)])
def test_compressed_run_saves_and_loads_identically(tiny_lm, windows, tmp_path, steps):
    model = tiny_lm()
    record = new_record("test")
    if "prune" in steps:
        record["steps"].append(prune(model, calibrate(model, windows), 0.5, "reap", per_layer=True).to_dict())
    if "merge" in steps:
        record["steps"].append(merge(model, calibrate(model, windows), 0.5).to_dict())
    if "quantize" in steps:
        record["steps"].append(quantize(model, "mixed:4", calibrate(model, windows), group_size=16).to_dict())
    cfg = TrainConfig(seq_len=32)
    save_trained(model, cfg, tmp_path / "run", record)
    loaded, cfg2, _ = load_trained(tmp_path / "run")
    torch.testing.assert_close(loaded(windows), model(windows), rtol=0, atol=0)
    saved = read_json(tmp_path / "run" / "config.json")
    assert [s["method"] for s in saved["compression"]["steps"]] == list(steps)
    assert saved["compression"]["version"] == 1


def _compressed(tiny_lm, windows, kind):
    model = tiny_lm()
    if kind == "per-layer":
        for layer, keep in zip(moe_layers(model), ([0, 1, 2], [0, 1, 2, 3, 4, 5]), strict=True):
            apply_keep(layer, keep)
        record_counts(model)
        assert model.cfg.moe_num_experts == [3, 6]
    elif kind == "quantised":
        quantize(model, "int8", group_size=16)
    else:
        merge(model, calibrate(model, windows), 0.5)
    return model


@pytest.mark.parametrize(("kind", "export_why", "store_why"), [("per-layer", "different expert counts", "one expert count"),
                                                               ("quantised", "quantised", "quantised"),
                                                               ("merged", "merged", "merged")])
def test_export_and_expert_store_refuse_what_they_cannot_hold(tiny_lm, windows, tmp_path, kind, export_why, store_why):
    from moekit.offload import write_store

    model = _compressed(tiny_lm, windows, kind)
    with pytest.raises(ExportError, match=export_why):
        export_hf(model, tmp_path / "x")
    with pytest.raises(ValueError, match=store_why):
        write_store(model, tmp_path / "s")
    assert not (tmp_path / "x").exists() and not (tmp_path / "s").exists()


def test_uniformly_pruned_model_exports(tiny_lm, windows, tmp_path):
    model = tiny_lm()
    prune(model, calibrate(model, windows), 0.5, "reap")
    assert model.cfg.moe.num_experts == 4 and model.cfg.moe_num_experts is None
    path = export_hf(model, tmp_path / "hf")
    assert json.loads((path / "config.json").read_text())["num_local_experts"] == 4


def test_a_damaged_record_is_refused(tiny_lm, windows, tmp_path):
    from moekit.compress import restore

    with pytest.raises(DataError, match="newer"):
        restore(tiny_lm(), {"format": "moekit-compression", "version": 99, "steps": []})
    with pytest.raises(DataError, match="unknown step"):
        restore(tiny_lm(), {"format": "moekit-compression", "version": 1, "steps": [{"method": "zip"}]})


def test_a_uniformly_pruned_model_goes_to_the_expert_store(tiny_lm, windows, tmp_path):
    from moekit.offload import ExpertStore, write_store

    model = tiny_lm()
    prune(model, calibrate(model, windows), 0.5, "reap")  # the same share in every layer: an ordinary model
    store = ExpertStore(write_store(model, tmp_path / "s"))
    assert store.num_experts == 4 and store.num_layers == 2
