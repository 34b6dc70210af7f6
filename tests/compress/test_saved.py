import json

import pytest
import torch

from moekit.compress import calibrate, merge, new_record, prune, quantize
from moekit.errors import DataError
from moekit.hf.export import ExportError, export_hf
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


def test_export_refuses_compressed_models_in_one_line(tiny_lm, windows, tmp_path):
    model = tiny_lm()
    prune(model, calibrate(model, windows), 0.5, "freq", per_layer=True)
    model.cfg.moe_num_experts = [3, 5]  # whatever the scores chose: layers of different counts
    with pytest.raises(ExportError, match="different expert counts"):
        export_hf(model, tmp_path / "x")
    q = tiny_lm()
    quantize(q, "int8", group_size=16)
    with pytest.raises(ExportError, match="quantised"):
        export_hf(q, tmp_path / "y")
    m = tiny_lm()
    merge(m, calibrate(m, windows), 0.5)
    with pytest.raises(ExportError, match="merged"):
        export_hf(m, tmp_path / "z")
    assert not (tmp_path / "x").exists()


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


def test_expert_store_refuses_what_its_format_cannot_hold_and_takes_uniform_pruning(tiny_lm, windows, tmp_path):
    from moekit.offload import ExpertStore, write_store

    model = tiny_lm()
    prune(model, calibrate(model, windows), 0.5, "reap")  # the same share in every layer: an ordinary model
    store = ExpertStore(write_store(model, tmp_path / "s"))
    assert store.num_experts == 4
    per_layer = tiny_lm()
    prune(per_layer, calibrate(per_layer, windows), 0.5, "freq", per_layer=True)
    if per_layer.cfg.moe_num_experts is not None:
        with pytest.raises(ValueError, match="one expert count"):
            write_store(per_layer, tmp_path / "p")
    q = tiny_lm()
    quantize(q, "int4", group_size=16)
    with pytest.raises(ValueError, match="quantised"):
        write_store(q, tmp_path / "q")
    m = tiny_lm()
    merge(m, calibrate(m, windows), 0.5)
    with pytest.raises(ValueError, match="merged"):
        write_store(m, tmp_path / "m")
