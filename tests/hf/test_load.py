"""The transformers version guard and the local loader used by the CLI."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import moekit.hf
from moekit.errors import UsageError


@pytest.mark.parametrize("version", ["4.57.1", "5.0.0.dev0", "6.0.0", "6.0.0.dev0", "not-a-version"])
def test_unsupported_transformers_is_named(monkeypatch, make_model, version):
    model = make_model("olmoe")
    # the transformers module moekit.hf checks (another test may have re-imported transformers)
    monkeypatch.setattr(moekit.hf.version.transformers, "__version__", version)
    with pytest.raises(RuntimeError, match=rf"supports transformers >=5.0,<6 .*transformers {version} is installed"):
        moekit.hf.wrap(model)
    assert not moekit.hf.wrapped_blocks(model)


@pytest.mark.parametrize("version", ["5.0.0", "5.23.0", "5.24.0.dev0", "5.99.1"])
def test_supported_transformers_versions(monkeypatch, version):
    # the transformers module moekit.hf checks (another test may have re-imported transformers)
    monkeypatch.setattr(moekit.hf.version.transformers, "__version__", version)
    assert moekit.hf.check_transformers_version() == version


def _save_tokenizer(path) -> None:
    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "<unk>", "hello", "experts", "route"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>").save_pretrained(path)


def test_load_pretrained_wraps_a_local_checkpoint(make_model, prompt, tmp_path):
    model = make_model("qwen2_moe")
    ids = prompt()
    with torch.no_grad():
        ref = model(ids).logits
    model.save_pretrained(tmp_path)

    loaded, tokenizer = moekit.hf.load_pretrained(tmp_path)
    assert tokenizer is None  # the directory has no tokenizer
    assert len(moekit.hf.wrapped_blocks(loaded)) == 2 and not loaded.training
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, ref, atol=1e-5, rtol=1e-5)

    _save_tokenizer(tmp_path)
    loaded, tokenizer = moekit.hf.load_pretrained(str(tmp_path), dtype="bfloat16")
    assert tokenizer is not None and tokenizer("hello experts")["input_ids"] == [4, 5]
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}


def test_load_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        moekit.hf.load_pretrained(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        moekit.hf.load_pretrained(tmp_path)


def test_a_model_that_is_not_a_causal_lm_is_named_in_one_line(tmp_path):
    # Before: transformers' "Unrecognized configuration class ..." listing every causal-LM config (> 3000 characters).
    from transformers import NllbMoeConfig

    NllbMoeConfig(d_model=16, encoder_layers=1, decoder_layers=1).save_pretrained(tmp_path)
    with pytest.raises(UsageError) as e:
        moekit.hf.load_pretrained(tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 400, msg
    assert "a nllb-moe model (NllbMoeConfig)" in msg and "causal language model" in msg


def test_an_unknown_model_type_is_named_in_one_line(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "not_a_family"}')
    with pytest.raises(UsageError, match="model_type 'not_a_family', which transformers .* does not "
                                                       "know; expected") as e:
        moekit.hf.load_pretrained(tmp_path)
    assert "\n" not in str(e.value) and len(str(e.value)) < 400
    # Before: "has model_type None, which transformers ... does not know"
    (tmp_path / "config.json").write_text('{"hidden_size": 8}')
    with pytest.raises(UsageError, match="its config.json has no model_type; expected") as e:
        moekit.hf.load_pretrained(tmp_path)
    assert "\n" not in str(e.value) and "None" not in str(e.value)


def test_the_cli_names_an_encoder_decoder_directory_in_one_line(tmp_path, capsys):
    from transformers import SwitchTransformersConfig

    from moekit.cli import main

    SwitchTransformersConfig(d_model=16, num_layers=1, num_decoder_layers=1).save_pretrained(tmp_path / "switch")
    for command in (["generate", "--prompt", "a"], ["analyze", "--out", str(tmp_path / "report")],
                    ["compress", "--prune", "0.5", "--out", str(tmp_path / "small")]):
        assert main([command[0], "--hf", str(tmp_path / "switch"), *command[1:]]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "switch_transformers" in err and "causal language model" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["switch"]  # nothing written
