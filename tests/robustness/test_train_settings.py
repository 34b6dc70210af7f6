"""No silent wrong answer from a setting: every numeric field checked (finite, in range) naming its
flag, a diverging loss stopped, a resumed run or a compare directory never trained or labelled with
settings other than its own, and the inference commands' arguments checked."""

import dataclasses
import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch

import moekit
from moekit.cli import main
from moekit.cli.generate import prompt_ids as _prompt_ids
from moekit.config import MoEConfig, RouterConfig
from moekit.errors import UsageError
from moekit.models import LMConfig
from moekit.train import TrainConfig, train
from moekit.train import checkpoint as ckpt
from moekit.train.trainer import DivergedError

sys.path.insert(0, str(Path(__file__).parents[1] / "train"))
from test_trainer import losses, quick, tiny  # noqa: E402  (the canonical tiny run)

QUIET = {"progress": False, "log": lambda *_: None}
TINY = ["--model.d_model", "32", "--model.n_layers", "2", "--model.n_heads", "2", "--moe.d_expert", "32",
        "--moe.num_experts", "4", "--train.steps", "3", "--train.micro_batch", "2", "--train.seq_len", "16",
        "--train.eval_tokens", "64", "--train.threads", "1", "--no-progress"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    path = tmp_path_factory.mktemp("settings") / "run"
    assert main(["train", "--out", str(path), *TINY]) == 0
    return path


@pytest.mark.parametrize("flags,message", [
    (["--train.lr", "inf"], "--train.lr inf is invalid; allowed: a finite number"),
    (["--train.lr", "nan"], "--train.lr nan is invalid; allowed: a finite number"),
    (["--train.z_loss_coef", "nan"], "--train.z_loss_coef nan is invalid; allowed: a finite number"),
    (["--train.load_balance_coef", "-1"], "--train.load_balance_coef -1.0 is invalid; allowed: a finite float >= 0"),
    (["--router.kind", "topk", "--router.routed_scaling_factor", "inf"], "--router.routed_scaling_factor inf is invalid"),
    (["--router.k", "3"], "--router.k does not apply to router kind 'topp' (--router.kind changes it); its flags: "
                          "--router.gate_dtype, --router.jitter, --router.kind, --router.logit_scale, --router.max_k"),
    (["--model.norm_eps=-1e-6"], "--model.norm_eps -1e-06 is invalid; allowed: a finite float > 0"),
    (["--model.init_std", "nan"], "--model.init_std nan is invalid"),
    (["--model.rope_theta", "0"], "--model.rope_theta 0.0 is invalid; allowed: a finite float > 0"),
    (["--train.weight_decay", "-0.1"], "--train.weight_decay -0.1 is invalid; allowed: a finite float >= 0"),
    (["--train.beta1", "2"], r"--train.beta1 2.0 is invalid; allowed: a float in [0, 1)"),
    (["--train.beta2", "1"], r"--train.beta2 1.0 is invalid; allowed: a float in [0, 1)"),
    (["--train.seed", "-1"], "--train.seed -1 is invalid; allowed: an integer in [0, 2**63)"),
    (["--train.checkpoint_every", "0"], "--train.checkpoint_every 0 is invalid; allowed: an integer >= 1"),
    (["--train.eval_every", "-1"], "--train.eval_every -1 is invalid; allowed: an integer >= 0"),
    (["--train.eval_tokens", "0"], "--train.eval_tokens 0 is invalid; allowed: an integer >= 1"),
    (["--model.max_seq_len", "64", "--train.seq_len", "65"],
     "--train.seq_len 65 is invalid; allowed: an integer in [1, 64] (at most --model.max_seq_len)"),
    (["--model.max_seq_len", "100000", "--train.seq_len", "90000"],
     r"--train.seq_len 90000 is invalid; allowed: at most \d+ \(the \w+ validation text is \d+ tokens"),
    (["--model.n_kv_heads", "-2"], "--model.n_kv_heads -2 is invalid"),
    (["--model.d_model", "0"], "--model.d_model 0 is invalid; allowed: an integer >= 1"),
    (["--router.kind", "expert_choice", "--router.allow_causal_leak", "false"], "--router.kind 'expert_choice' is not causal"),
])
def test_bad_settings_are_refused_naming_the_flag_before_anything_is_written(tmp_path, flags, message):
    out = tmp_path / "run"
    with pytest.raises(UsageError) as e:
        main(["train", "--out", str(out), *TINY, *flags])
    text = str(e.value)
    assert re.match(re.escape(message) if "\\" not in message else message, text), text
    assert "\n" not in text and not out.exists()


def _float_fields():
    for cls in (LMConfig, MoEConfig, TrainConfig):
        for f in dataclasses.fields(cls):
            if "float" in str(f.type):
                yield cls, f.name, None
    for kind in moekit.registered_routers():  # every router's own config
        for f in dataclasses.fields(RouterConfig(kind=kind)):
            if "float" in str(f.type):
                yield RouterConfig, f.name, kind


def _with(cls, name, value, kind=None):
    model, train_cfg = tiny(), quick()
    if cls is TrainConfig:
        return model, dataclasses.replace(train_cfg, **{name: value})
    if cls is LMConfig:
        return dataclasses.replace(model, **{name: value}), train_cfg
    if cls is MoEConfig:
        return dataclasses.replace(model, moe=dataclasses.replace(model.moe, **{name: value})), train_cfg
    router = model.moe.router.convert(kind, **{name: value})
    return dataclasses.replace(model, moe=dataclasses.replace(model.moe, router=router)), train_cfg


@pytest.mark.parametrize("cls,name,kind", list(_float_fields()), ids=lambda x: getattr(x, "__name__", x))
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_every_float_field_of_every_config_must_be_finite(tmp_path, cls, name, kind, value):
    model_cfg, train_cfg = _with(cls, name, value, kind)
    with pytest.raises(UsageError, match=rf"^{cls.__name__}\.{name}=(nan|inf|-inf) is invalid"):
        train(model_cfg, train_cfg, tmp_path / "run", **QUIET)
    assert not (tmp_path / "run").exists()


def test_a_non_finite_loss_stops_the_run_naming_the_step_with_the_last_checkpoint_intact(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(DivergedError, match=r"^training diverged at step (\d+): loss .*, gradient norm ") as e:
        train(tiny(), quick(lr=1e3, warmup_steps=0, checkpoint_every=2, steps=20), run, **QUIET)
    step = int(re.match(r"training diverged at step (\d+)", str(e.value))[1])
    latest = ckpt.latest_checkpoint(run)  # the last good checkpoint is there, verified, with finite weights
    meta = ckpt.read_meta(latest)
    assert 0 < meta["step"] < step and f"checkpoint {latest.name} is intact" in str(e.value)
    model, _, _ = moekit.train.load_trained(run)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert [row[0] for row in losses(run)] == list(range(1, step))  # no row for the diverged step
    assert all(math.isfinite(row[1]) for row in losses(run))


def test_resume_refuses_settings_that_differ_from_the_saved_run(run):
    before = (run / "metrics.jsonl").read_bytes()
    with pytest.raises(UsageError, match=r"was trained with other settings.*: --train\.lr 0\.01 \(the run has 0\.003\)$"):
        main(["train", "--out", str(run), "--resume", "--train.lr", "0.01", "--no-progress"])
    with pytest.raises(UsageError, match=r"--router\.kind 'topk' \(the run has 'topp'\)"):
        main(["train", "--out", str(run), "--resume", "--preset", "topk", *TINY])
    model_cfg, train_cfg = moekit.train.trainer.load_run_config(run)
    with pytest.raises(UsageError, match=r"TrainConfig\.steps=9 \(the run has 3\)"):
        train(model_cfg, dataclasses.replace(train_cfg, steps=9), run, resume=True, **QUIET)
    assert (run / "metrics.jsonl").read_bytes() == before
    # the same settings, given again, are accepted
    assert main(["train", "--out", str(run), "--resume", "--train.lr", "0.003", *TINY]) == 0


def test_compare_resumes_only_runs_with_the_same_settings(tmp_path):
    out = tmp_path / "cmp"
    assert main(["compare", "--presets", "topk,topp", "--out", str(out), *TINY]) == 0
    report = (out / "compare.json").read_text()
    with pytest.raises(UsageError, match=r"compare: .*topk holds a run trained with other settings \(--train\.steps 4 "
                                         r"\(the run has 3\)\); choose another --out"):
        main(["compare", "--presets", "topk,topp", "--out", str(out), *TINY, "--train.steps", "4"])
    assert (out / "compare.json").read_text() == report  # old results are not relabelled
    assert json.loads(report)["train"]["steps"] == 3
    assert main(["compare", "--presets", "topk,topp", "--out", str(out), *TINY]) == 0  # same settings: resumed


@pytest.mark.parametrize("args,message", [
    (["--max-new-tokens", "0"], "--max-new-tokens 0 is invalid; allowed: an integer >= 1"),
    (["--max-new-tokens", "-5"], "--max-new-tokens -5 is invalid; allowed: an integer >= 1"),
    (["--max-new-tokens", "600"], "--max-new-tokens 600 is invalid: with the prompt's 4 tokens it exceeds the "
                                  "model's max_seq_len 512; allowed: at most 508"),
    (["--temperature", "nan"], "--temperature nan is invalid"),
    (["--temperature", "-1"], "--temperature -1.0 is invalid"),
    (["--top-p", "0"], "--top-p 0.0 is invalid; allowed: a number in (0, 1]"),
    (["--seed", "-1"], "--seed -1 is invalid"),
])
def test_generate_arguments_are_checked(run, args, message):
    with pytest.raises(UsageError) as e:
        main(["generate", str(run), "--prompt", "def ", *args])
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


@pytest.mark.parametrize("args,message", [
    (["--tokens", "0"], "--tokens 0 is invalid; allowed: an integer >= 1"),
    (["--seq-len", "0"], "--seq-len 0 is invalid; allowed: an integer >= 1"),
    (["--seq-len", "100000"], "--seq-len 100000 is invalid; allowed: at most the model's max_seq_len (512)"),
])
def test_eval_arguments_are_checked(run, args, message):
    with pytest.raises(UsageError) as e:
        main(["eval", str(run), *args])
    assert str(e.value) == message


def test_a_prompt_that_is_not_utf8_is_taken_as_bytes_or_refused(run, capsys):
    prompt = b"caf\xe9 ".decode("utf-8", errors="surrogateescape")  # what Python makes of latin-1 in argv
    assert main(["generate", str(run), "--prompt", prompt, "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.startswith("caf\ufffd ")  # the byte model saw the byte 0xe9
    assert _prompt_ids(prompt, moekit.data.ByteTokenizer()) == list(b"caf\xe9 ")
    with pytest.raises(UsageError, match=r"^--prompt is not valid UTF-8 \(byte 0xe9 at offset 3\); this model's "
                                         r"tokenizer needs UTF-8 text$"):
        _prompt_ids(prompt, moekit.data.load_bpe_tokenizer())


def test_a_directory_that_is_not_a_run_is_one_line(tmp_path):
    for argv in (["eval", str(tmp_path / "nothing")], ["generate", str(tmp_path), "--prompt", "a"],
                 ["train", "--out", str(tmp_path / "nothing"), "--resume"]):
        with pytest.raises(UsageError, match=r"is not a moekit run \(it has no config.json or checkpoints/\)"):
            main(argv)
    assert not (tmp_path / "nothing").exists()


@pytest.mark.parametrize("flags,line", [
    (["--train.lr", "inf"], "moekit train: --train.lr inf is invalid; allowed: a finite number\n"),
    (["--train.checkpoint_every", "0"], "moekit train: --train.checkpoint_every 0 is invalid; allowed: an integer >= 1\n"),
])
def test_the_command_prints_the_same_line(flags, line, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MOEKIT_DEBUG")
    assert main(["train", "--out", str(tmp_path / "r"), *TINY, *flags]) == 2
    assert capsys.readouterr().err.splitlines()[-1] + "\n" == line
    assert not (tmp_path / "r").exists()
