"""Every private transformers name moekit.hf relies on still exists and still does what moekit assumes.

When a transformers release drops or changes one, this file fails, naming it (moekit.hf itself then
fails to import or raises, rather than switching a feature off). The last test keeps the list
complete: no other file of moekit.hf imports or reads a private transformers name.
"""

import ast
import importlib
from pathlib import Path

import pytest
import torch

import moekit.hf
from moekit.hf import private_api
from moekit.hf.block import recorded_router_output

HF_SRC = Path(private_api.__file__).parent


@pytest.mark.parametrize(("module", "name"), private_api.PRIVATE_SYMBOLS, ids=lambda x: x)
def test_private_symbol_exists(module, name):
    assert hasattr(importlib.import_module(module), name), f"transformers no longer has {module}.{name}"


def test_output_capturing_is_what_output_router_logits_uses(make_model, prompt):
    model = make_model("mixtral")
    gate = model.model.layers[0].mlp.gate
    specs = private_api.record_specs(model)["router_logits"]
    assert isinstance(specs, private_api.OutputRecorder) and isinstance(gate, specs.target_class)
    assert recorded_router_output(model, gate) is not None
    assert recorded_router_output(model, model.model.layers[0].self_attn) is None
    # The collector is a context variable: None outside a recording forward, {output name: [tensors]} inside.
    assert private_api.active_collector.get() is None
    seen = []
    hook = gate.register_forward_hook(lambda *_: seen.append(private_api.active_collector.get()))
    with torch.no_grad():
        model(prompt(1, 4), output_router_logits=True)
    hook.remove()
    assert seen and all(isinstance(c, dict) and "router_logits" in c for c in seen)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_unwrap_after_a_recording_forward_records_router_logits_again(make_model, prompt, family):
    """transformers hooks the modules present at the first recording forward and never looks again: a model
    wrapped then, then unwrapped, must record its restored routers' logits (and each hidden state once)."""
    reference, model = make_model(family), make_model(family)
    ids = prompt(1, 6)
    with torch.no_grad():
        ref = reference(ids, output_router_logits=True, output_hidden_states=True)
        moekit.hf.wrap(model)
        model(ids, output_router_logits=True)
        moekit.hf.unwrap(model)
        out = model(ids, output_router_logits=True, output_hidden_states=True)
    assert len(out.router_logits) == len(ref.router_logits) > 0
    assert all(torch.equal(a, b) for a, b in zip(out.router_logits, ref.router_logits, strict=True))
    assert len(out.hidden_states) == len(ref.hidden_states)
    torch.testing.assert_close(out.aux_loss, ref.aux_loss)


def test_default_apply_gate_is_the_experts_gating(make_model):
    experts = make_model("mixtral").model.layers[0].mlp.experts
    assert type(experts)._apply_gate is private_api.default_apply_gate
    h = torch.randn(3, experts.gate_up_proj.shape[1])  # (S, 2F)
    gate, up = h.chunk(2, dim=-1)
    torch.testing.assert_close(private_api.default_apply_gate(experts, h), experts.act_fn(gate) * up)
    # The layout flags @use_experts_implementation sets, which moekit.hf.detect reads.
    for flag in ("has_gate", "has_bias", "is_transposed", "is_concatenated", "has_post_expert_norm"):
        assert hasattr(experts, flag), f"transformers' experts no longer set {flag}"


def test_experts_implementation_can_be_read_and_switched(make_model):
    experts = make_model("mixtral").model.layers[0].mlp.experts
    config = experts.config
    before = private_api.experts_implementation(config)
    assert before is not None  # a built model has chosen one
    private_api.set_experts_implementation(config, "eager")
    assert config._experts_implementation == "eager"  # the property transformers' forward reads
    private_api.set_experts_implementation(config, before)

    class NoSuchAttribute:
        pass

    with pytest.raises(ImportError, match="_experts_implementation_internal, which transformers"):
        private_api.experts_implementation(NoSuchAttribute())


def test_a_missing_symbol_fails_loudly():
    with pytest.raises(ImportError, match=r"moekit.hf needs transformers.utils.nothing_here, which transformers .* "
                                          r"install a tested version"):
        private_api._require("transformers.utils", "nothing_here")


def test_no_other_private_transformers_name_in_moekit_hf():
    """Private names come only through private_api.py: no `from transformers... import _x`, no try/except
    ImportError fallback around a transformers import, no private attribute read elsewhere."""
    found = []
    for path in sorted(HF_SRC.glob("*.py")):
        if path.name == "private_api.py":
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("transformers"):
                found += [f"{path.name}:{node.lineno}: imports {node.module}.{a.name}" for a in node.names
                          if a.name.startswith("_")]
            if isinstance(node, ast.Try) and any(
                    isinstance(n, ast.ImportFrom) and (n.module or "").startswith("transformers") for n in node.body):
                found.append(f"{path.name}:{node.lineno}: try/except around a transformers import")
            name = node.attr if isinstance(node, ast.Attribute) else (
                node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None)
            if name in private_api.PRIVATE_ATTRIBUTES:
                found.append(f"{path.name}:{node.lineno}: reads {name} (use moekit.hf.private_api)")
    assert not found, "\n".join(found)
    assert moekit.hf.wrap  # the package imports with every private name present
