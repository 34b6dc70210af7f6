"""The console script."""

import json
import subprocess
import sys

import pytest

import moekit
from moekit.cli import main


def test_info_lists_routers_and_backend(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "topk" in out and "expert_choice" in out and "grouped GEMM" in out


def test_console_script_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "moekit.cli", "info"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("moekit ")


TINY = ["--model.d_model", "32", "--model.n_layers", "2", "--model.n_heads", "2", "--moe.d_expert", "32",
        "--moe.num_experts", "4", "--train.steps", "3", "--train.micro_batch", "2", "--train.seq_len", "16",
        "--train.eval_tokens", "64", "--train.threads", "1", "--no-progress"]


def test_flags_map_one_to_one_onto_config_fields():
    import argparse

    from moekit.cli.flags import add_config_flags, apply_flags
    from moekit.train.presets import preset

    p = argparse.ArgumentParser()
    add_config_flags(p)
    args = p.parse_args(["--router.kind", "topp", "--router.p", "0.3", "--router.max_k", "none",
                         "--moe.num_experts", "16", "--model.tie_embeddings", "false", "--train.lr", "1e-3"])
    model_cfg, train_cfg = apply_flags(*preset("tiny"), args)
    assert (model_cfg.moe.router.kind, model_cfg.moe.router.p, model_cfg.moe.router.max_k) == ("topp", 0.3, None)
    assert model_cfg.moe.num_experts == 16 and model_cfg.tie_embeddings is False and train_cfg.lr == 1e-3
    assert model_cfg.n_layers == preset("tiny")[0].n_layers  # flags not given keep the preset's values
    with pytest.raises(SystemExit):
        p.parse_args(["--model.tie_embeddings", "maybe"])


def test_train_eval_generate_commands(tmp_path, capsys):
    run = str(tmp_path / "run")
    assert main(["train", "--out", run, "--router.kind", "topp", *TINY]) == 0
    out = capsys.readouterr().out
    assert '"kind": "topp"' in out and "unigram baseline" in out and "bits per byte" in out
    assert main(["eval", run, "--tokens", "64"]) == 0
    table = capsys.readouterr().out
    assert "japanese" in table and "all" in table
    assert main(["generate", run, "--prompt", "def ", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("def ")
    assert main(["train", "--out", str(tmp_path / "bad"), "--router.p", "2", *TINY]) == 2  # one line, no traceback
    assert capsys.readouterr().err == "moekit train: --router.p 2.0 is invalid; allowed: a float in (0, 1]\n"


def test_compare_writes_one_table(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "--presets", "topk,topp", "--out", str(out), *TINY]) == 0
    report = json.loads((out / "compare.json").read_text())
    assert set(report["runs"]) == {"topk", "topp"}
    for row in report["runs"].values():
        assert row["val_bpb"] > 0 and len(row["experts_per_token_by_layer"]) == 2
        assert set(row["experts_per_token_by_domain"]) == set(moekit.data.DOMAINS)
    md = (out / "compare.md").read_text()
    assert md.count("\n| top") == 2 and "bpb japanese" in md


def test_compare_sweeps_a_field_over_seeds_into_groups_and_a_pareto_plot(tmp_path, capsys):
    out = tmp_path / "sweep"
    assert main(["compare", "--presets", "topp", "--sweep", "router.p=0.3,0.6", "--seeds", "2", "--out", str(out),
                 *TINY]) == 0
    report = json.loads((out / "compare.json").read_text())
    assert set(report["runs"]) == {"topp-p0.3-s0", "topp-p0.3-s1", "topp-p0.6-s0", "topp-p0.6-s1"}
    assert report["seeds"] == [0, 1] and report["runs"]["topp-p0.6-s1"]["seed"] == 1
    assert "p=0.6" in report["runs"]["topp-p0.6-s0"]["router"]
    g = report["groups"]["topp-p0.3"]
    assert g["runs"] == ["topp-p0.3-s0", "topp-p0.3-s1"]
    bpb = [report["runs"][r]["val_bpb"] for r in g["runs"]]
    assert g["val_bpb"]["mean"] == pytest.approx(sum(bpb) / 2)
    assert g["val_bpb"]["std"] == pytest.approx(abs(bpb[0] - bpb[1]) / 2 ** 0.5)
    assert bpb[0] != bpb[1]  # another seed: another initialisation and data order
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "compare.md").read_text()
    assert "seeds 0, 1" in md and "| topp-p0.3 | 2 |" in md and " ± " in md
    capsys.readouterr()
    assert main(["compare", "--presets", "topk", "--sweep", "router.p=0.3", "--out", str(tmp_path / "x"), *TINY]) == 2
    assert capsys.readouterr().err == "moekit compare: --sweep router.p: no preset among topk has this field\n"
    assert main(["compare", "--sweep", "router.p=a", "--out", str(tmp_path / "x"), *TINY]) == 2
    assert "expected float" in capsys.readouterr().err
