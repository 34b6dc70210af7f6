"""`--route SPEC` of `moekit generate | eval | analyze`: the model re-routed (`moekit.route`) before it runs."""

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import moekit
import moekit.hf
from moekit.cli import main

GEN = ["--prompt", "abc", "--max-new-tokens", "12"]


# hf_dir: the tiny OLMoE checkpoint of tests/conftest.py


def _text(ids) -> str:
    return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def _eval(hf_dir, capsys, *route) -> list[float]:
    assert main(["eval", "--hf", str(hf_dir), "--tokens", "64", "--seq-len", "32", "--json", *route]) == 0
    return json.loads(capsys.readouterr().out)["experts_per_token_by_layer"]


def test_generate_route_prints_what_python_reroute_and_greedy_generation_print(hf_dir, capsys):
    assert main(["generate", "--hf", str(hf_dir), *GEN, "--route", "topp,p=0.5"]) == 0
    out = capsys.readouterr().out
    model = moekit.hf.load_pretrained(hf_dir)[0]
    with moekit.route(model, kind="topp", p=0.5):
        ref = model.generate(torch.tensor([[97, 98, 99]]), max_new_tokens=12, do_sample=False)
    assert out.rstrip("\n") == _text(ref[0].tolist())


def test_route_changes_the_experts_per_token(hf_dir, capsys):
    # Would fail if --route were ignored: the model's own rule runs 2 experts per token at every layer.
    assert _eval(hf_dir, capsys) == [2.0, 2.0]
    topp = _eval(hf_dir, capsys, "--route", "topp,p=0.5")
    assert topp != [2.0, 2.0] and all(1.0 <= k <= 4.0 for k in topp)
    assert _eval(hf_dir, capsys, "--route", "k=1") == [1.0, 1.0]  # no kind: the model's own rule, one field changed
    # repeated: applied in order, the second inside the first
    assert _eval(hf_dir, capsys, "--route", "k=1", "--route", "topp,p=0.5") == topp


def test_analyze_records_the_rerouted_model(hf_dir, tmp_path, capsys):
    args = ["--samples-per-domain", "1", "--seq-len", "16", "--boot", "5", "--no-progress", "--workers", "1",
            "--srp-n", "4", "--sch-n", "4", "--model-sch-n", "4", "--model-multiples", "1", "--max-multiple", "1"]
    assert main(["analyze", "--hf", str(hf_dir), "--out", str(tmp_path / "a"), "--route", "k=1", *args]) == 0
    assert " k=1.00;" in capsys.readouterr().out
    meta = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert "k=1" in json.dumps(meta)
    # a recorded trace cannot be re-routed: refused, naming what is expected
    assert main(["analyze", str(tmp_path / "a" / "trace.npz"), "--out", str(tmp_path / "b"), "--route", "k=1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a trace file" in err and "expected a run directory or --hf DIR" in err


@pytest.mark.parametrize("route", ["topp,p=0.5", "k=1"])
def test_offloaded_generation_with_route_equals_resident_with_route(hf_dir, route, capsys):
    gen = ["generate", "--hf", str(hf_dir), *GEN, "--route", route]
    assert main(gen) == 0
    resident = capsys.readouterr().out
    assert main([*gen, "--expert-budget", "50%"]) == 0
    assert capsys.readouterr().out == resident
    if route == "k=1":
        assert main(["generate", "--hf", str(hf_dir), *GEN]) == 0
        assert capsys.readouterr().out != resident  # k=1 changes this model's greedy text


@pytest.mark.parametrize("route, message", [
    ("bogus", "--route 'bogus': unknown router kind 'bogus'; expected one of "),
    ("topp,q=1", "--route 'topp,q=1': 'q' is not a field of router kind 'topp'; expected one of "),
    ("q=1", "--route 'q=1': 'q' is not a field of router kind 'topk'; expected one of "),
    ("topp,p=x", "--route 'topp,p=x': p: expected float, got 'x'"),
    ("topp,p=1.5", "--route 'topp,p=1.5': RouterConfig.p=1.5 is invalid; allowed: a float in (0, 1]"),
    ("k=9", "--route 'k=9': RouterConfig.k=9 is invalid; allowed: an integer in [1, num_experts=4]"),
    ("topp,p", "argument --route: 'topp,p': 'p' is not FIELD=VALUE; expected KIND[,FIELD=VALUE,...]"),
    (",", "argument --route: empty re-route ','; expected KIND[,FIELD=VALUE,...]"),
])
@pytest.mark.parametrize("command", ["generate", "eval"])
def test_bad_route_exits_2_in_one_line(hf_dir, command, route, message, capsys):
    args = [command, "--hf", str(hf_dir), "--route", route, *(GEN if command == "generate" else ["--tokens", "64"])]
    try:
        code = main(args)
    except SystemExit as e:  # an argparse error (the syntax) exits as argparse does
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    last = err.rstrip("\n").rpartition("\n")[2].rpartition("\r")[2]  # after transformers' loading progress bar
    assert "Traceback" not in err and last.startswith(f"moekit {command}: {message}")
    if "invalid" not in message and not route.startswith("q="):  # syntax, a named kind, its fields: before loading
        assert err.count("\n") == 1 and "\r" not in err


def _family_dir(save_hf, tmp_path, model_type: str, **kwargs):
    base = dict(vocab_size=128, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=96, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **{**base, **kwargs}))
    return save_hf(model, tmp_path / model_type)


@pytest.mark.parametrize("family, route, message", [
    # a sigmoid-scored rule cannot become the softmax-only null router (RouterConfig.convert's refusal)
    ("deepseek_v3", "null,n_null=4,k=3", "kind='null'"),
    # the hash layer's table fixes its seed (HashRouter.check_reroute's refusal); seed: a field of the model's hash
    # layers, though not of its top-k layers
    ("deepseek_v4", "seed=5", "RouterConfig(kind='hash') seed=5: its experts come from the layer's table tid2eid"),
])
def test_a_reroute_moekit_route_refuses_exits_2_with_its_message(tmp_path, family, route, message, capsys, save_hf):
    kwargs = {
        "deepseek_v3": dict(num_key_value_heads=4, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2,
                            n_group=4, topk_group=2, n_shared_experts=1, routed_scaling_factor=2.5,
                            norm_topk_prob=True, first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=32,
                            qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16),
        "deepseek_v4": dict(head_dim=16, num_local_experts=8, num_experts_per_tok=2, q_lora_rank=16, o_lora_rank=16,
                            kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, index_topk=4,
                            index_n_heads=2, index_head_dim=16, mlp_layer_types=["hash_moe", "moe", "moe"],
                            swiglu_limit=1.0, routed_scaling_factor=1.5, sliding_window=64),
    }[family]
    path = _family_dir(save_hf, tmp_path, family, **kwargs)
    assert main(["generate", "--hf", str(path), "--prompt", "abc", "--max-new-tokens", "2", "--route", route]) == 2
    err = capsys.readouterr().err
    last = err.rstrip("\n").rpartition("\n")[2].rpartition("\r")[2]
    assert "Traceback" not in err and last.startswith(f"moekit generate: --route {route!r}: ") and message in last


def test_help_documents_route_with_an_example(capsys):
    for command in ("generate", "eval", "analyze"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        out = " ".join(capsys.readouterr().out.split())
        assert "--route SPEC" in out and "--route topp,p=0.5,min_k=1" in out


_BIG_IDS = dict(vocab_size=300, bos_token_id=256, eos_token_id=257, pad_token_id=258)
_KWARGS = {
    "deepseek_v3": dict(num_key_value_heads=4, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2,
                        n_group=4, topk_group=2, n_shared_experts=1, routed_scaling_factor=2.5, norm_topk_prob=True,
                        first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=32, qk_rope_head_dim=8,
                        qk_nope_head_dim=8, v_head_dim=16),
    "deepseek_v4": dict(head_dim=16, num_local_experts=8, num_experts_per_tok=2, q_lora_rank=16, o_lora_rank=16,
                        kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, index_topk=4,
                        index_n_heads=2, index_head_dim=16, mlp_layer_types=["hash_moe", "moe", "moe"],
                        swiglu_limit=1.0, routed_scaling_factor=1.5, sliding_window=64),
}


@pytest.mark.parametrize("family, route", [("deepseek_v3", "topp,p=0.5"), ("deepseek_v3", "k=1"),
                                           ("deepseek_v4", "topk,k=2")])
def test_offloaded_generation_of_a_model_rerouted_to_another_kind_equals_resident(tmp_path, family, route, capsys,
                                                                                    save_hf):
    """A router state the new kind does not use (DeepSeek-V3's selection bias under top-p, V4's hash table tid2eid
    under top-k), then offloaded: the runtime releases the experts through the wrapped block's `original()`, which
    failed with KeyError: 'e_score_correction_bias' / 'tid2eid' (a traceback) once the new router had replaced the
    old one."""
    path = _family_dir(save_hf, tmp_path, family, **_KWARGS[family], **_BIG_IDS)
    gen = ["generate", "--hf", str(path), *GEN, "--route", route]
    assert main(gen) == 0
    resident = capsys.readouterr().out
    assert main([*gen, "--expert-budget", "50%"]) == 0
    assert capsys.readouterr().out == resident


def test_route_hash_on_a_family_without_token_ids_exits_2_naming_the_route(hf_dir, capsys):
    assert main(["generate", "--hf", str(hf_dir), *GEN, "--route", "hash"]) == 2
    err = capsys.readouterr().err
    last = err.rstrip("\n").rpartition("\n")[2].rpartition("\r")[2]
    assert "Traceback" not in err and last.startswith("moekit generate: --route 'hash': ") and "token ids" in last
