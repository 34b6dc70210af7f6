"""`moekit eval | generate | analyze` on a moekit run and on a local transformers checkpoint (--hf)."""

import json

import pytest
import torch
from transformers import OlmoeForCausalLM

from moekit.cli import main

TINY = ["--model.d_model", "32", "--model.n_layers", "2", "--model.n_heads", "2", "--moe.d_expert", "32",
        "--moe.num_experts", "4", "--train.steps", "2", "--train.micro_batch", "2", "--train.seq_len", "16",
        "--train.eval_tokens", "64", "--train.threads", "1", "--no-progress"]


# hf_dir: the tiny OLMoE checkpoint of tests/conftest.py


def test_eval_hf_reports_every_domain(hf_dir, capsys):
    assert main(["eval", "--hf", str(hf_dir), "--tokens", "64", "--seq-len", "32", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["bpb"] > 0 and len(result["per_domain"]) == 6
    assert result["experts_per_token_by_layer"] == [2.0, 2.0]  # routed through moekit's layers


def test_generate_hf_greedy_equals_transformers(hf_dir, capsys):
    assert main(["generate", "--hf", str(hf_dir), "--prompt", "abc", "--max-new-tokens", "12"]) == 0
    out = capsys.readouterr().out
    ref = OlmoeForCausalLM.from_pretrained(hf_dir).generate(torch.tensor([[97, 98, 99]]), max_new_tokens=12,
                                                               do_sample=False)
    expected = bytes(i for i in ref[0].tolist() if i < 256).decode("utf-8", errors="replace")
    assert out.rstrip("\n") == expected


def test_analyze_hf_and_run_write_report_and_trace(hf_dir, tmp_path, capsys):
    args = ["--samples-per-domain", "2", "--seq-len", "32", "--boot", "10", "--no-progress", "--workers", "1"]
    assert main(["analyze", "--hf", str(hf_dir), "--out", str(tmp_path / "a"), *args]) == 0
    for f in ("report.html", "metrics.json", "trace.npz"):
        assert (tmp_path / "a" / f).is_file()
    # a fixed top-k model: difficulty is recorded, its correlation undefined (constant k), not 0
    hf_metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert hf_metrics["difficulty"]["n_tokens"] > 0 and hf_metrics["difficulty"]["overall"] is None
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), *TINY]) == 0
    assert main(["analyze", str(run), "--out", str(tmp_path / "b"), *args]) == 0
    metrics = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert metrics["trace"]["num_layers"] == 2
    assert len(metrics["difficulty"]["per_layer"]) == 2 and len(metrics["difficulty"]["per_domain"]) == 6
    # the saved trace can be analysed again on its own
    assert main(["analyze", str(tmp_path / "b" / "trace.npz"), "--out", str(tmp_path / "c"), *args]) == 0
    capsys.readouterr()
    assert main(["eval", str(run), "--hf", str(hf_dir)]) == 2
    assert capsys.readouterr().err == "moekit eval: give exactly one of RUN and --hf DIR\n"


def test_exactly_one_source_is_required(hf_dir, tmp_path, capsys):
    assert main(["eval"]) == 2
    assert capsys.readouterr().err == "moekit eval: give exactly one of RUN and --hf DIR\n"
    assert main(["analyze", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err == ("moekit analyze: give exactly one of SOURCE (run directory or trace file) and "
                                       "--hf DIR\n")
    assert main(["offload", str(tmp_path)]) == 2
    assert capsys.readouterr().err == "moekit offload: give RUN OUT, or --hf DIR OUT (got 1 paths)\n"


@pytest.fixture(scope="module")
def hf_dir_with_a_larger_tokenizer(hf_dir, tmp_path_factory):
    """The tiny OLMoE (300 ids) with a tokenizer that gives "the" the id 350, beyond the model's embedding."""
    import shutil

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("hf") / "olmoe-tok"
    shutil.copytree(hf_dir, path)
    tok = Tokenizer(models.WordLevel({"<unk>": 0, "a": 5, "the": 350}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<unk>").save_pretrained(path)
    return path


@pytest.mark.parametrize("command", [["generate", "--prompt", "a the a"], ["eval", "--tokens", "64", "--seq-len", "16"]])
def test_ids_beyond_the_models_vocabulary_exit_2_in_one_line(hf_dir_with_a_larger_tokenizer, command, capsys):
    # Before the check: transformers' embedding raised a raw IndexError, a traceback with exit code 1.
    assert main([command[0], "--hf", str(hf_dir_with_a_larger_tokenizer), *command[1:]]) == 2
    err = capsys.readouterr().err
    last = err.rstrip("\n").rpartition("\n")[2].rpartition("\r")[2]  # after transformers' loading progress bar
    assert "Traceback" not in err and last.startswith(f"moekit {command[0]}")
    assert "token id(s) 350 out of range; expected token ids in [0, 300)" in last


@pytest.fixture(scope="module")
def hf_dir_stopping_early(hf_dir, tmp_path_factory):
    """The tiny OLMoE whose generation_config stops at the 4th token greedy decoding of "abc" gives (and at a second
    id it never gives): transformers' generate stops there, tokens 5.. never appear."""
    import shutil

    ref = OlmoeForCausalLM.from_pretrained(hf_dir).generate(torch.tensor([[97, 98, 99]]), max_new_tokens=12,
                                                               do_sample=False)[0, 3:].tolist()
    stop = ref[3]
    assert stop not in ref[:3]  # so the stop falls after three tokens, mid-stream
    path = tmp_path_factory.mktemp("hf") / "olmoe-stop"
    shutil.copytree(hf_dir, path)
    gen = json.loads((path / "generation_config.json").read_text())
    (path / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": [299, stop]}))
    return path, ref[:4]


def test_offloaded_generation_stops_where_resident_generation_stops(hf_dir_stopping_early, capsys):
    # Before: the resident run (transformers' generate) stopped at the model's generation_config eos ids, the
    # offloaded run at the tokenizer's eos (here the byte tokenizer's 257) and went on: different text.
    path, tokens = hf_dir_stopping_early
    gen = ["generate", "--hf", str(path), "--prompt", "abc", "--max-new-tokens", "12"]
    assert main(gen) == 0
    resident = capsys.readouterr().out
    assert resident.rstrip("\n") == bytes(i for i in [97, 98, 99, *tokens] if i < 256).decode("utf-8", "replace")
    assert main([*gen, "--expert-budget", "50%"]) == 0
    assert capsys.readouterr().out == resident


@pytest.fixture(scope="module")
def hf_dir_with_generation_settings(hf_dir, tmp_path_factory):
    """The tiny OLMoE with a generation_config that changes greedy decoding (a strong repetition penalty, as real
    checkpoints ship milder ones) and sampling (top_k)."""
    import shutil

    path = tmp_path_factory.mktemp("hf") / "olmoe-gen"
    shutil.copytree(hf_dir, path)
    gen = json.loads((path / "generation_config.json").read_text())
    (path / "generation_config.json").write_text(json.dumps({**gen, "repetition_penalty": 3.0, "top_k": 3}))
    return path


@pytest.mark.parametrize("sampling", [[], ["--temperature", "1.0", "--seed", "3"]])
def test_offloaded_generation_prints_what_resident_generation_prints(hf_dir_with_generation_settings, sampling, capsys):
    # Before: the resident run was transformers' generate (the checkpoint's repetition penalty and top_k applied,
    # transformers' sampler), the offloaded run moekit's loop: other text, greedy and sampled, from one command line.
    gen = ["generate", "--hf", str(hf_dir_with_generation_settings), "--prompt", "abc", "--max-new-tokens", "16",
           *sampling]
    assert main(gen) == 0
    resident = capsys.readouterr().out
    assert main([*gen, "--expert-budget", "50%"]) == 0
    assert capsys.readouterr().out == resident


def test_generation_settings_the_cli_does_not_apply_are_named_on_stderr(hf_dir, hf_dir_with_generation_settings,
                                                                         tmp_path, capsys):
    import shutil

    # Before: resident --hf generation stopped running transformers' generate (which applied the checkpoint's
    # repetition penalty and top_k) and said nothing: the text changed silently.
    gen = ["--prompt", "abc", "--max-new-tokens", "4"]
    assert main(["generate", "--hf", str(hf_dir_with_generation_settings), *gen]) == 0
    err = capsys.readouterr().err
    note = [line for line in err.splitlines() if "generation_config" in line]
    assert len(note) == 1 and note[0].startswith("moekit generate:")
    assert "sets repetition_penalty=3.0, which" in note[0] and "--temperature" in note[0]  # top_k: a greedy run's too
    gen_dir = tmp_path / "olmoe-sampling"  # sampling settings only, which the flags can give: then no note
    shutil.copytree(hf_dir, gen_dir)
    config = json.loads((gen_dir / "generation_config.json").read_text())
    (gen_dir / "generation_config.json").write_text(json.dumps({**config, "do_sample": True, "temperature": 0.6,
                                                                "top_p": 0.9}))
    assert main(["generate", "--hf", str(gen_dir), *gen, "--temperature", "0.6", "--top-p", "0.9"]) == 0
    assert "generation_config" not in capsys.readouterr().err
    assert main(["generate", "--hf", str(gen_dir), *gen]) == 0  # greedy: the checkpoint's sampling is named
    assert "do_sample=True, temperature=0.6, top_p=0.9, which" in capsys.readouterr().err
    (gen_dir / "generation_config.json").write_text(json.dumps({**config, "top_k": 20}))
    assert main(["generate", "--hf", str(gen_dir), *gen]) == 0  # greedy: transformers ignores top_k too
    assert "generation_config" not in capsys.readouterr().err
    assert main(["generate", "--hf", str(gen_dir), *gen, "--temperature", "1"]) == 0  # sampling: it would apply
    assert "sets top_k=20, which" in capsys.readouterr().err
    assert main(["generate", "--hf", str(hf_dir), *gen]) == 0  # nothing set: no note
    assert "generation_config" not in capsys.readouterr().err
