"""Compression of wrapped transformers models (tiny random configs of the real classes; nothing downloaded)."""

import json

import pytest
import torch

pytest.importorskip("transformers")

from transformers import AutoModelForCausalLM, MixtralConfig, OlmoeConfig, Qwen3MoeConfig  # noqa: E402

import moekit.hf  # noqa: E402
from moekit.compress import calibrate, merge, new_record, prune, quantize  # noqa: E402
from moekit.compress.hf import RECORD, WEIGHTS, export_hf_dir, load_hf, save_hf  # noqa: E402
from moekit.compress.prune import apply_keep  # noqa: E402
from moekit.compress.quantize import QuantizedExpertBank  # noqa: E402
from moekit.errors import UsageError  # noqa: E402
from moekit.layers.moe import moe_layers  # noqa: E402

_COMMON = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
FAMILIES = {
    "mixtral": lambda v: MixtralConfig(vocab_size=v, **_COMMON, intermediate_size=32, num_local_experts=8,
                                       num_experts_per_tok=2),
    "qwen3_moe": lambda v: Qwen3MoeConfig(vocab_size=v, **_COMMON, moe_intermediate_size=32, intermediate_size=64,
                                          num_experts=8, num_experts_per_tok=2, head_dim=16),
    "olmoe": lambda v: OlmoeConfig(vocab_size=v, **_COMMON, intermediate_size=32, num_experts=8, num_experts_per_tok=2),
}
IDS = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(1))


def _wrapped(family: str, vocab: int = 128):
    torch.manual_seed(0)
    return moekit.hf.wrap(AutoModelForCausalLM.from_config(FAMILIES[family](vocab)).eval())


def _calib(model):
    return calibrate(model, IDS, forward=lambda x: model(input_ids=x), outputs=True)


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("family", list(FAMILIES))
def test_uniform_pruning_of_a_wrapped_model_is_a_transformers_checkpoint(family, tmp_path):
    model = _wrapped(family)
    record = new_record("test")
    record["steps"].append(prune(model, _calib(model), 0.5, "reap").to_dict())
    assert [m.router.num_experts for m in moe_layers(model)] == [4, 4]
    assert [m.experts.gate_up_proj.shape[0] for m in moe_layers(model)] == [4, 4]  # the stacked tensors shrank
    expected = _logits(model)
    save_hf(model, record, tmp_path / "out")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out", local_files_only=True).eval()  # no moekit
    torch.testing.assert_close(plain(input_ids=IDS).logits, expected, rtol=0, atol=1e-5)
    loaded, _ = load_hf(tmp_path / "out")
    torch.testing.assert_close(_logits(loaded), expected, rtol=0, atol=0)
    saved = json.loads((tmp_path / "out" / RECORD).read_text())
    assert saved["version"] == 1 and saved["hf"]["transformers"] and saved["hf"]["counts"] == [4, 4]
    assert export_hf_dir(tmp_path / "out", tmp_path / "exp").is_dir()
    with pytest.raises(UsageError, match="pruned, merged or quantised"):
        moekit.hf.unwrap(model)
    assert (tmp_path / "exp" / "config.json").is_file()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_per_layer_merged_quantised_wrapped_model_round_trips_and_export_refuses(family, tmp_path):
    model = _wrapped(family)
    record = new_record("test")
    for layer, keep in zip(moe_layers(model), ([0, 2, 5], [1, 2, 3, 4, 6, 7]), strict=True):
        apply_keep(layer, keep)  # different counts per layer
    record["steps"].append({"method": "prune", "criterion": "test", "before": [8, 8], "kept": [[0, 2, 5], [1, 2, 3, 4, 6, 7]]})
    record["steps"].append(merge(model, _calib(model), 0.34).to_dict())
    record["steps"].append(quantize(model, "mixed:5", _calib(model), group_size=16).to_dict())
    assert all(isinstance(m.experts, QuantizedExpertBank) for m in moe_layers(model))
    expected = _logits(model)
    save_hf(model, record, tmp_path / "out")
    assert (tmp_path / "out" / WEIGHTS).is_file() and not (tmp_path / "out" / "model.safetensors").exists()
    loaded, _ = load_hf(tmp_path / "out")
    assert [m.router.num_experts for m in moe_layers(loaded)] == [3, 6]
    torch.testing.assert_close(_logits(loaded), expected, rtol=0, atol=0)
    with pytest.raises(UsageError, match="different expert counts"):
        export_hf_dir(tmp_path / "out", tmp_path / "exp")
    assert not (tmp_path / "exp").exists()
    with pytest.raises(OSError):  # transformers finds no weights it knows instead of loading random ones
        AutoModelForCausalLM.from_pretrained(tmp_path / "out", local_files_only=True)
    with pytest.raises(UsageError, match="moekit's own format"):
        moekit.hf.load_pretrained(tmp_path / "out")
    with pytest.raises(UsageError, match="pruned, merged or quantised by moekit.compress"):
        moekit.hf.unwrap(loaded)


def test_pruning_a_wrapped_model_to_all_experts_is_the_identity_and_survivors_keep_their_output():
    model = _wrapped("mixtral")
    expected = _logits(model)
    prune(model, _calib(model), 0.0)
    torch.testing.assert_close(_logits(model), expected, rtol=0, atol=0)
    # Mixtral renormalises its top-2: a token whose two experts survive keeps its layer output exactly
    layer = moe_layers(model)[0]
    x_TD = torch.randn(32, 64)
    y_before = layer(x_TD[None])[0]
    chosen_TK = layer.router(x_TD).to_padded()[0]
    keep = sorted(set(chosen_TK[0].tolist()) | {e for e in range(8) if e % 2 == 0})
    apply_keep(layer, keep)
    y_after = layer(x_TD[None])[0]
    survive_T = torch.tensor([set(r.tolist()) <= set(keep) for r in chosen_TK])
    assert survive_T[0] and not survive_T.all()
    torch.testing.assert_close(y_after[survive_T], y_before[survive_T], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantised_wrapped_block_equals_transformers_on_the_dequantised_weights(method):
    """The grouped path over int codes against transformers' own forward with the dequantised weights."""
    model = _wrapped("qwen3_moe")
    quantize(model, method, group_size=16)
    reference = AutoModelForCausalLM.from_config(FAMILIES["qwen3_moe"](128)).eval()
    state = {k: v for k, v in model.state_dict().items() if ".experts." not in k}
    reference.load_state_dict(state, strict=False)
    for layer, ref in zip(moe_layers(model), [b.mlp for b in reference.model.layers], strict=True):
        pairs = [layer.experts.expert_weights(e) for e in range(8)]
        with torch.no_grad():
            ref.experts.gate_up_proj.copy_(torch.stack([p[0] for p in pairs]))
            ref.experts.down_proj.copy_(torch.stack([p[1] for p in pairs]))
    torch.testing.assert_close(_logits(model), reference(input_ids=IDS).logits, rtol=1e-4, atol=1e-4)
    assert {m.experts.last_active for m in moe_layers(model)} - {0}  # the quantised grouped path ran


def test_a_quantised_wrapped_model_offloads_its_compressed_bytes(tmp_path):
    from moekit.compress.quantize import expert_bytes
    from moekit.offload import ExpertStore, offloaded_generate, write_store

    full, model = _wrapped("olmoe"), _wrapped("olmoe")
    prune(model, _calib(model), 0.5)
    quantize(model, "int4", group_size=16)
    with ExpertStore(write_store(model, tmp_path / "s")) as store:
        assert store.total_nbytes == expert_bytes(model) < expert_bytes(full) / 10  # half the experts at ~4.5 bits
    prompt = IDS[:1, :6]
    budget = expert_bytes(full) // 4
    small = offloaded_generate(model, prompt, 4, budget=budget, policy="lru", simulate=False).metrics
    big = offloaded_generate(full, prompt, 4, budget=budget, policy="lru", simulate=False).metrics
    assert small["capacity_experts"] == 4 and big["capacity_experts"] < 4  # every one of the 4 kept experts fits
    assert small["bytes_moved_per_token"] < big["bytes_moved_per_token"]


@pytest.mark.slow  # ~15 s: four commands on a transformers model
def test_compress_hf_cli_then_eval_generate_analyze_on_the_result(tmp_path, capsys):
    from moekit.cli import main

    src = tmp_path / "hf"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(FAMILIES["olmoe"](300)).save_pretrained(src)  # no tokenizer: byte fallback
    out = tmp_path / "small"
    rc = main(["compress", "--hf", str(src), "--prune", "0.5", "--per-layer", "--quantize", "int4", "--no-protect-super",
               "--group-size", "16", "--calib", "python", "--calib-tokens", "64", "--seq-len", "32", "--out", str(out),
               "--no-progress"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "pruned 8 of 16 experts" in text and "not a transformers checkpoint" in text
    assert main(["eval", "--hf", str(out), "--tokens", "64", "--seq-len", "32", "--json"]) == 0
    assert '"bpb"' in capsys.readouterr().out
    assert main(["generate", "--hf", str(out), "--prompt", "ab", "--max-new-tokens", "3"]) == 0
    resident = capsys.readouterr().out
    assert main(["generate", "--hf", str(out), "--prompt", "ab", "--max-new-tokens", "3", "--expert-budget", "50%"]) == 0
    assert resident.strip() in capsys.readouterr().out
    assert main(["analyze", "--hf", str(out), "--out", str(tmp_path / "trace"), "--samples-per-domain", "1", "--seq-len", "32", "--workers", "1", "--boot", "10", "--no-progress"]) == 0
    assert main(["compress", "--hf", str(out), "--prune", "0.5", "--out", str(tmp_path / "again")]) == 2
    assert "written by moekit compress" in capsys.readouterr().err
    assert main(["export", str(out), "--to", "hf", str(tmp_path / "exp")]) == 2
    assert "cannot be written as a transformers checkpoint: its layers keep different expert counts" in capsys.readouterr().err
    assert main(["compress", "--hf", str(src), "--prune", "0.5", "--calib", "python", "--calib-tokens", "64",
                 "--seq-len", "32", "--out", str(tmp_path / "pruned"), "--no-progress"]) == 0
    assert "a transformers checkpoint" in capsys.readouterr().out
    assert main(["export", str(tmp_path / "pruned"), "--to", "hf", str(tmp_path / "exp")]) == 0
    assert json.loads((tmp_path / "exp" / "config.json").read_text())["num_experts"] == 4


def test_a_selection_bias_trained_on_a_wrapped_model_survives_save_and_load(tmp_path):
    # Mixtral's router has no selection bias; aux-loss-free balancing (moekit.route(bias_update_rate=...)) trains
    # one. A transformers checkpoint has no place for it (from_pretrained would drop it and route otherwise):
    # save_hf writes moekit's own format, and load_hf routes as the saved model.
    model = _wrapped("mixtral")
    record = new_record("test")
    record["steps"].append(prune(model, _calib(model), 0.5, "reap").to_dict())
    with moekit.route(model, bias_update_rate=1.0):
        for layer in moe_layers(model):
            layer.router.update_bias(torch.tensor([9, 0, 0, 9]))
    expected = _logits(model)
    save_hf(model, record, tmp_path / "out")
    saved = json.loads((tmp_path / "out" / RECORD).read_text())
    assert not saved["hf"]["transformers"] and "selection bias" in saved["hf"]["why_not_transformers"]
    loaded, _ = load_hf(tmp_path / "out")
    for a, b in zip(moe_layers(model), moe_layers(loaded), strict=True):
        assert torch.equal(a.router.e_score_correction_bias, b.router.e_score_correction_bias)
    torch.testing.assert_close(_logits(loaded), expected, rtol=0, atol=0)


def test_dbrx_expert_bytes_count_its_split_stacks_and_compression_refuses_them_in_one_line(tmp_path, capsys,
                                                                                           monkeypatch):
    # Before: `moekit compress --hf DBRX` died in expert_bytes with AttributeError ('tuple' object has no attribute
    # 'nbytes': DBRX's gate and up are two flat stacks) and a traceback, before any refusal.
    from transformers import DbrxConfig

    from moekit.cli import main
    from moekit.compress.quantize import expert_bytes

    cfg = DbrxConfig(vocab_size=300, d_model=32, n_heads=2, n_layers=2, max_seq_len=64,
                     attn_config={"kv_n_heads": 2, "rope_theta": 1e4, "clip_qkv": 8.0}, ffn_config={"ffn_hidden_size": 16, "moe_num_experts": 4,
                                                               "moe_top_k": 2})
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "dbrx")
    model, _ = moekit.hf.load_pretrained(tmp_path / "dbrx")
    experts = [m.experts for m in moe_layers(model)]
    assert expert_bytes(model) == 2 * 3 * 4 * 16 * 32 * 4  # layers x (w1, v1, w2) x E x F x D x fp32
    assert sum(t.nbytes for b in experts for t in (*b.w_in, b.down_proj)) == expert_bytes(model)
    from moekit import compress as compress_package

    def no_calibration(*args, **kwargs):  # the layout is refused before any calibration pass (hours on a big model)
        raise AssertionError("calibrated a model whose experts are then refused")

    monkeypatch.setattr(compress_package, "calibration_windows", no_calibration)
    for step in (["--prune", "0.5"], ["--merge", "m-smoe"], ["--quantize", "int8", "--group-size", "16"]):
        assert main(["compress", "--hf", str(tmp_path / "dbrx"), "--out", str(tmp_path / "out"), *step,
                     "--calib-tokens", "64", "--seq-len", "16", "--no-progress"]) == 2
        err = capsys.readouterr().err
        last = err.rstrip("\n").rpartition("\n")[2].rpartition("\r")[2]  # after transformers' progress bars
        assert "Traceback" not in err and last.startswith("moekit compress: ") and "split, flat" in last, err
    assert not (tmp_path / "out").exists()
