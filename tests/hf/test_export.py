"""`moekit export RUN --to hf DIR`: identical logits after loading with AutoModelForCausalLM."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import moekit
from moekit.cli import main
from moekit.hf.export import ExportError, export_hf
from moekit.models import LMConfig, MoELM


def lm(router=None, moe_kw=None, **kw):
    moe = moekit.MoEConfig(d_expert=32, num_experts=4, router=router or moekit.RouterConfig(k=2), **(moe_kw or {}))
    return LMConfig(**{"vocab_size": 100, "d_model": 32, "n_layers": 3, "n_heads": 2, "max_seq_len": 64,
                       "moe": moe, **kw})


CASES = {
    "MixtralForCausalLM": lm(),
    "Qwen3MoeForCausalLM": lm(moekit.RouterConfig(k=2, normalize=False), qk_norm=True, n_dense=1, n_kv_heads=1),
    "Glm4MoeForCausalLM": lm(moekit.RouterConfig(k=2, score="sigmoid", n_group=2, topk_group=1,
                                                 routed_scaling_factor=2.5, bias_update_rate=1e-3),
                             {"num_shared_experts": 1}, n_dense=1, tie_embeddings=False),
    # gpt-oss's rule and clamped SwiGLU (issue 14 item 6)
    "GptOssForCausalLM": lm(moekit.RouterConfig(k=2), {"activation_limit": 7.0, "activation_alpha": 1.702,
                                                      "activation_up_offset": 1.0}, n_kv_heads=1),
    # Llama 4's rule: sigmoid of the top-k logits on the expert input, a shared expert; a dense first layer
    "Llama4ForCausalLM": lm(moekit.RouterConfig(k=1, score="sigmoid", normalize=False),
                            {"weight_on_input": True, "num_shared_experts": 1}, n_dense=1, tie_embeddings=False),
}


@pytest.mark.parametrize("arch", list(CASES))
def test_export_loads_in_transformers_with_identical_logits_and_greedy_tokens(arch, tmp_path):
    torch.manual_seed(0)
    model = MoELM(CASES[arch]).eval()
    if model.cfg.moe.router.hf_routing()["selection_bias"]:
        for layer in model.moe_layers():
            layer.router.e_score_correction_bias.normal_(0, 0.1)  # a trained selection bias travels too
    export_hf(model, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == arch
    ids = torch.randint(0, 100, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, model(ids), atol=1e-5, rtol=1e-5)
    from moekit.models.generate import generate

    ours = generate(model, ids[:1, :5], 16)
    theirs = hf.generate(ids[:1, :5], max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("router,match", [
    (moekit.RouterConfig(kind="topp"), "'topp' router"),
    (moekit.RouterConfig(kind="null", n_null=2), "'null' router"),
    (moekit.RouterConfig(kind="recurrent", gru_dim=8), "'recurrent' router"),
    (moekit.RouterConfig(k=2, normalize=False), "always renormalises"),
])
def test_routers_transformers_cannot_express_are_refused(router, match, tmp_path):
    with pytest.raises(ExportError, match=match):
        export_hf(MoELM(lm(router)), tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


CLAMPED = {"activation_limit": 7.0, "activation_alpha": 1.702, "activation_up_offset": 1.0}


@pytest.mark.parametrize("router, moe_kw, match", [
    (moekit.RouterConfig(k=2), {"activation_limit": 7.0}, "GPT-OSS computes clamp.up, -limit, limit. . 1"),
    (moekit.RouterConfig(k=2, normalize=False), CLAMPED, "GPT-OSS routes by a softmax over the top-k logits"),
    (moekit.RouterConfig(k=2), {**CLAMPED, "num_shared_experts": 1}, "GPT-OSS has no shared expert"),
    (moekit.RouterConfig(k=1, score="sigmoid", normalize=False), {"weight_on_input": True},
     "Llama 4 has one ungated shared expert"),
    (moekit.RouterConfig(k=2, score="sigmoid", normalize=True), {"weight_on_input": True, "num_shared_experts": 1},
     "the score on the expert input is Llama 4's rule"),
])
def test_gpt_oss_and_llama4_rules_export_only_as_they_are(router, moe_kw, match, tmp_path):
    with pytest.raises(ExportError, match=match):
        export_hf(MoELM(lm(router, moe_kw)), tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_a_softmax_selection_bias_is_refused(tmp_path):
    model = MoELM(lm())
    model.moe_layers()[0].router.e_score_correction_bias[0] = 0.5
    with pytest.raises(ExportError, match="selection bias"):
        export_hf(model, tmp_path / "hf")


def test_export_command(tmp_path):
    run = tmp_path / "run"
    tiny = ["--model.d_model", "32", "--model.n_layers", "2", "--model.n_heads", "2", "--moe.d_expert", "32",
            "--moe.num_experts", "4", "--router.kind", "topk", "--train.steps", "2", "--train.micro_batch", "2",
            "--train.seq_len", "16", "--train.eval_tokens", "32", "--no-progress"]
    assert main(["train", "--out", str(run), *tiny]) == 0
    assert main(["export", str(run), "--to", "hf", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "config.json").is_file()
    assert main(["eval", "--hf", str(tmp_path / "hf"), "--tokens", "32", "--seq-len", "16"]) == 0


def test_a_training_capacity_exports_and_an_eval_capacity_is_refused(tmp_path):
    """Capacity limits drop only in training, so the exported model computes what moekit's eval mode does."""
    torch.manual_seed(0)
    model = MoELM(lm(moe_kw={"capacity_factor": 0.5})).eval()
    export_hf(model, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, 100, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, model(ids), atol=1e-5, rtol=1e-5)
    with pytest.raises(ExportError, match="eval_capacity_factor"):
        export_hf(MoELM(lm(moe_kw={"eval_capacity_factor": 1.0})), tmp_path / "hf2")


@pytest.mark.parametrize("kw", [{}, dict(qk_norm=True)])
def test_a_softmax_after_topk_router_is_not_exported_as_a_renormalising_family(kw, tmp_path):
    """Mixtral and Qwen3-MoE renormalise the top k of the softmax: not gpt-oss's rule bit for bit."""
    with pytest.raises(ExportError, match="softmax over the top-k logits .softmax_after_topk"):
        export_hf(MoELM(lm(moekit.RouterConfig(k=2, softmax_after_topk=True), **kw)), tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_gpt_oss_export_of_a_softmax_after_topk_router_keeps_its_rule_bit_for_bit(tmp_path):
    """GPT-OSS's router is the softmax over the top-k logits: the loaded checkpoint wraps with that rule and its
    router's weights are the moekit router's, bit for bit."""
    import moekit.hf

    torch.manual_seed(0)
    model = MoELM(lm(moekit.RouterConfig(k=2, softmax_after_topk=True), CLAMPED, n_kv_heads=1)).eval()
    export_hf(model, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    x_TD = torch.randn(64, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _, hf_w_TK, hf_idx_TK = hf.model.layers[0].mlp.router(x_TD)
        idx_TK, w_TK = model.moe_layers()[0].router.dense_choice(x_TD)[:2]
    assert torch.equal(idx_TK, hf_idx_TK) and torch.equal(w_TK, hf_w_TK)
    moekit.hf.wrap(hf)
    assert all(layer.cfg.router.softmax_after_topk for layer in moekit.hf.wrapped_blocks(hf))


@pytest.mark.parametrize("tokenizer", ["byte", "bpe"])
def test_an_export_generates_what_the_run_generates(tokenizer, tmp_path, capsys):
    # Before: the export held no tokenizer and no special ids, so `moekit generate --hf` read a BPE run's export
    # with the byte tokenizer (other text) and transformers' generate never stopped at the run's eos.
    from transformers import AutoTokenizer

    from moekit.train import load_trained

    run, out = tmp_path / "run", tmp_path / "hf"
    tiny = ["--model.d_model", "32", "--model.n_layers", "1", "--model.n_heads", "2", "--moe.d_expert", "16",
            "--moe.num_experts", "4", "--router.kind", "topk", "--train.steps", "1", "--train.micro_batch", "1",
            "--train.seq_len", "16", "--train.eval_tokens", "16", "--train.tokenizer", tokenizer, "--no-progress"]
    assert main(["train", "--out", str(run), *tiny]) == 0
    assert main(["export", str(run), "--to", "hf", str(out)]) == 0
    _, _, tok = load_trained(run)
    hf = AutoModelForCausalLM.from_pretrained(out)
    for config in (hf.config, hf.generation_config):
        assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    if tokenizer == "bpe":
        hf_tok = AutoTokenizer.from_pretrained(out)
        text = "def main():\n    return 'été'"
        assert hf_tok.encode(text, add_special_tokens=False) == tok.encode(text)
        assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    capsys.readouterr()
    gen = ["--prompt", "def ", "--max-new-tokens", "12"]
    assert main(["generate", str(run), *gen]) == 0
    ours = capsys.readouterr().out
    assert main(["generate", "--hf", str(out), *gen]) == 0
    assert capsys.readouterr().out == ours
