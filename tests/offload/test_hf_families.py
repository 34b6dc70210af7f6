"""`moekit generate --hf DIR --expert-budget 25%` and `moekit analyze --hf DIR` on wrapped gpt-oss (transposed,
interleaved, biased experts with a clamped SwiGLU), Llama 4 text (transposed experts, score on the expert
input, shared expert), Granite MoE (router child `router`) and the latent family Nemotron-H (shared D -> l -> D
projections around non-gated ReLU^2 experts, a biased shared MLP) and Gemma 4 (experts inside the decoder
layer, wrapped at its router and experts children): tiny random checkpoints written with
save_pretrained, nothing downloaded (issue 14 item 6)."""

from __future__ import annotations

import json

import pytest
import torch

from moekit.cli import main

IDS = {"vocab_size": 300, "bos_token_id": 256, "eos_token_id": 257, "pad_token_id": 258}
SMALL = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}


def _config(family: str):
    import transformers as tr

    if family == "gpt_oss":
        return tr.GptOssConfig(**IDS, **SMALL, head_dim=8, intermediate_size=32, num_local_experts=8,
                               num_experts_per_tok=2, layer_types=["full_attention", "sliding_attention"])
    if family == "llama4":
        return tr.Llama4TextConfig(**IDS, **SMALL, head_dim=8, intermediate_size=32, intermediate_size_mlp=48,
                                   num_local_experts=8, num_experts_per_tok=1)
    if family == "nemotron_h":
        return tr.AutoConfig.for_model("nemotron_h", **IDS, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                       head_dim=8, layers_block_type=["attention", "moe", "moe"], n_routed_experts=8,
                                       num_experts_per_tok=2, moe_intermediate_size=16,
                                       moe_shared_expert_intermediate_size=24, moe_latent_size=16, mlp_bias=True,
                                       n_group=2, topk_group=1)
    if family == "gemma4":  # experts inside the decoder layer (moekit/hf/inline.py)
        return tr.AutoConfig.for_model("gemma4_text", **IDS, **SMALL, head_dim=8, intermediate_size=32,
                                       moe_intermediate_size=16, num_experts=8, top_k_experts=2, enable_moe_block=True,
                                       vocab_size_per_layer_input=300, hidden_size_per_layer_input=8)
    return tr.GraniteMoeConfig(**IDS, **SMALL, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2)


@pytest.fixture(scope="module", params=["gpt_oss", "llama4", "granitemoe", "nemotron_h", "gemma4"])
def hf_dir(request, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(request.param))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # well-separated logits: the default init gives near-ties
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (1.5 * p.shape[-1] ** -0.5 if p.dim() > 1 else 0.1)
                    + (p.dim() == 1))
    path = tmp_path_factory.mktemp("hf") / request.param
    model.save_pretrained(path)
    return path


@pytest.mark.slow  # ~10-30 s per family on the shared 2-core machine
def test_offloaded_generation_is_token_identical_to_resident(hf_dir, tmp_path, capsys):
    gen = ["generate", "--hf", str(hf_dir), "--prompt", "abc", "--max-new-tokens", "10"]
    assert main(gen) == 0
    resident = capsys.readouterr().out
    figures = tmp_path / "offload.json"
    assert main([*gen, "--expert-budget", "25%", "--offload-json", str(figures)]) == 0
    assert capsys.readouterr().out == resident
    m = json.loads(figures.read_text())
    assert m["capacity_experts"] == 2 and m["peak_resident_expert_bytes"] <= m["budget_bytes"]
    assert m["simulated"]["hit_flags_equal_measured"]


@pytest.mark.slow
def test_analyze_reads_the_wrapped_routing(hf_dir, tmp_path):
    args = ["--samples-per-domain", "1", "--seq-len", "16", "--boot", "5", "--no-progress", "--workers", "1"]
    assert main(["analyze", "--hf", str(hf_dir), "--out", str(tmp_path / "a"), *args]) == 0
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert (metrics["trace"]["num_layers"], metrics["trace"]["num_experts"]) == (2, 8)


@pytest.mark.parametrize("family", ["gpt_oss", "llama4"])
def test_wrapped_forward_offloaded_is_bitwise_resident(family, tmp_path):
    """The default-suite check: a wrapped block's experts, offloaded, give the resident logits bit for bit."""
    from transformers import AutoModelForCausalLM

    import moekit.hf
    from moekit.offload import offload, write_store

    torch.manual_seed(0)
    model = moekit.hf.wrap(AutoModelForCausalLM.from_config(_config(family)).eval())
    ids = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
        with offload(model, write_store(model, tmp_path / "s"), "25%") as rt:
            assert rt.store.manifest["version"] == 3  # the bank's own layout
            out = model(ids).logits
    assert torch.equal(out, ref)
