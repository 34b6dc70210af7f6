"""scripts/hf_coverage.py: finds every sparse-MoE family, and its verdicts cannot hide a wrong wrap."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest
import torch

import moekit.hf

_PATH = pathlib.Path(__file__).resolve().parents[2] / "scripts" / "hf_coverage.py"
_spec = importlib.util.spec_from_file_location("hf_coverage", _PATH)
cov = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cov)

# The families issue #14 names, and the ones moekit wraps today.
NAMED = {"gpt_oss", "llama4", "phimoe", "granitemoe", "granitemoeshared", "granitemoehybrid", "dbrx", "jamba",
         "hunyuan_v1_moe", "ernie4_5_moe", "ernie4_5_vl_moe", "minimax_m2", "lfm2_moe", "longcat_flash", "nemotron_h",
         "deepseek_v4", "aria", "step3p7", "jetmoe", "switch_transformers", "nllb_moe", "cohere2_moe", "deepseek_ocr2",
         "flint", "mixtral", "olmoe", "qwen2_moe", "qwen3_moe", "deepseek_v3"}


def test_discovery_finds_every_named_family_and_no_dense_model():
    found = set(cov.sparse_moe_families())
    assert NAMED <= found, sorted(NAMED - found)
    assert not found & {"llama", "mistral", "qwen2", "bert", "gpt2"}
    assert set(cov.NOT_ROUTED) <= found  # listed, then excluded from the count with a reason


def test_config_kwargs_follow_the_tester_rule():
    from transformers import DeepseekV3Config, MixtralConfig

    kw = cov._config_kwargs(MixtralConfig, {"num_local_experts": 8, "hidden_act": "gelu", "not_a_field": 1})
    assert kw == {"num_local_experts": 8, "hidden_act": "gelu"}
    # attribute_map aliases: DeepseekV3Config maps num_local_experts -> n_routed_experts
    assert cov._config_kwargs(DeepseekV3Config, {"num_local_experts": 8})["n_routed_experts"] == 8


@pytest.mark.slow
def test_verdicts_match_refused_and_the_test_config_activation():
    assert cov.check("mixtral", "native")[1:] == ("match", "")
    assert cov.check("granitemoe", "native")[1] == "match"  # a `router` child, found by role
    assert cov.check("mixtral", "aligned")[1] == "match"  # transformers' test activation: gated GELU
    block, status, reason = cov.check("jetmoe", "native")
    assert (block, status) == ("JetMoeMoE", "match")  # JetMoeMoA, a mixture of attention, is not counted
    block, status, reason = cov.check("nllb_moe", "native")  # against transformers with NllbMoeExperts fixed
    assert (block, status) == ("NllbMoeSparseMLP", "match") and "fixed to 4.x's per-expert dispatch" in reason
    # against transformers 5.x's own forward (experts 0 and 1 only) the wrapped model is, rightly, different
    assert cov._check("nllb_moe", "native")[1] == "MISMATCH"


@pytest.mark.slow
def test_a_wrong_or_missing_wrap_is_reported_not_passed(monkeypatch):
    real_wrap = moekit.hf.wrap

    def wrap_then_corrupt(model, **kw):
        real_wrap(model, **kw)
        with torch.no_grad():
            moekit.hf.wrapped_blocks(model)[0].experts.down_proj.mul_(1.01)
        return model

    monkeypatch.setattr(moekit.hf, "wrap", wrap_then_corrupt)
    status, reason = cov.check("mixtral", "native")[1:]
    assert status == "MISMATCH" and "differs" in reason
    monkeypatch.setattr(moekit.hf, "wrap", lambda model, **kw: model)  # wraps nothing
    status, reason = cov.check("mixtral", "native")[1:]
    assert status == "partial" and "MixtralSparseMoeBlock" in reason
