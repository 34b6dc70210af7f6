"""Files written by moekit before routers owned their configs still load and give identical results.

The fixtures under tests/fixtures/v1 were written once by tests/fixtures/v1/make.py with moekit at commit
e81cc9e, whose RouterConfig JSON was the union of every router's fields (`"type": "RouterConfig",
"version": 1`): one tiny trained MoELM per router family (config, state_dict, input ids, logits and
executed experts), a training run directory with a checkpoint, a routing trace and an expert store.
"""

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, load_model

from moekit.analysis.trace import corpus_batches, record_trace
from moekit.analysis.tracefile import load_trace, read_header
from moekit.data import ByteTokenizer, load_corpus
from moekit.models import LMConfig, MoELM

V1 = Path(__file__).parent / "fixtures" / "v1"
KINDS = ["topk", "topp", "null", "expert_choice", "recurrent", "random"]


def load_fixture_model(kind: str) -> MoELM:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a version-1 union config loads silently
        cfg = LMConfig.from_dict(json.loads((V1 / "models" / kind / "config.json").read_text()))
    model = MoELM(cfg)
    load_model(model, str(V1 / "models" / kind / "model.safetensors"))  # strict: every key, no extra
    return model.eval()


@pytest.mark.parametrize("kind", KINDS)
def test_old_model_loads_and_computes_the_same(kind):
    model = load_fixture_model(kind)
    assert model.cfg.moe.router.kind == kind
    want = load_file(str(V1 / "models" / kind / "expected.safetensors"))
    with torch.no_grad():
        logits = model(want["ids_BT"])
    torch.testing.assert_close(logits, want["logits_BTV"], rtol=1e-5, atol=1e-6)
    for i, layer in enumerate(model.moe_layers()):
        idx_TK, w_TK = layer.routing_info().executed.to_padded()
        assert torch.equal(idx_TK, want[f"experts_{i}_TK"]), (kind, i)
        torch.testing.assert_close(w_TK, want[f"weights_{i}_TK"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_old_config_round_trips_through_the_new_format(kind):
    old = json.loads((V1 / "models" / kind / "config.json").read_text())
    cfg = LMConfig.from_dict(old)
    again = LMConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    assert again.num_params() == cfg.num_params() and again.num_active_params() == cfg.num_active_params()


def test_old_run_resumes_and_evaluates_the_same(tmp_path):
    from moekit.train import load_trained, train
    from moekit.train.trainer import config_differences, load_run_config, resolve_configs, resolved_config

    run = tmp_path / "run"
    shutil.copytree(V1 / "run", run)
    saved = resolved_config(*resolve_configs(*load_run_config(run)))
    assert config_differences(saved, saved) == []
    model, cfg, _ = load_trained(run)
    assert model.cfg.moe.router.kind == "topk" and cfg.steps == 3
    bias = model.moe_layers()[0].router.e_score_correction_bias
    assert bias.abs().sum() > 0  # the checkpoint's aux-loss-free selection bias came back
    result = train(None, None, run, resume=True, progress=False, log=lambda *_: None)  # finished: evaluates only
    old = json.loads((V1 / "run" / "eval.json").read_text())
    assert result["loss"] == pytest.approx(old["loss"], rel=1e-6)
    assert result["experts_per_token_by_layer"] == pytest.approx(old["experts_per_token_by_layer"], abs=1e-4)


def test_old_trace_loads_and_matches_a_new_recording():
    old = load_trace(V1 / "trace.moetrace")
    model = load_fixture_model("topp")
    samples = list(load_corpus("validation"))[:6]
    new = record_trace(model, corpus_batches(samples, ByteTokenizer(), seq_len=24, batch_size=3), gate_lookahead=1)
    assert read_header(V1 / "trace.moetrace")["meta"]["routers"] == new.meta["routers"]
    assert len(old.seqs) == len(new.seqs) == 6
    for a, b in zip(old.seqs, new.seqs, strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(old.weights, new.weights, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(old.prefetch[1], new.prefetch[1], strict=True):
        np.testing.assert_array_equal(a, b)


def test_old_expert_store_loads_and_runs_offloaded(tmp_path):
    from moekit.offload import offload
    from moekit.offload.store import load_dense_lm

    store = tmp_path / "store"
    shutil.copytree(V1 / "store", store)
    model = load_dense_lm(store)
    want = load_file(str(V1 / "models" / "topk" / "expected.safetensors"))
    with offload(model, store, budget="50%"), torch.no_grad():
        logits = model(want["ids_BT"])
    torch.testing.assert_close(logits, want["logits_BTV"], rtol=1e-5, atol=1e-6)
