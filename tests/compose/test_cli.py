"""`moekit compose build | eval | serve` end to end on a two-step moekit run and a LoRA variant of it."""

from __future__ import annotations

import io
import json

import pytest

import moekit.adapters as ad
from moekit.cli import main


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    """A two-step dense moekit run, and a LoRA on it (random B, so the variant differs from the base)."""
    from moekit.config import MoEConfig, RouterConfig
    from moekit.models import LMConfig
    from moekit.train import TrainConfig, load_trained, train

    root = tmp_path_factory.mktemp("compose")
    moe = MoEConfig(d_model=32, d_expert=32, num_experts=2, router=RouterConfig(kind="topk", k=1))
    model_cfg = LMConfig(d_model=32, n_layers=2, n_heads=2, max_seq_len=64, n_dense=2, d_ff_dense=48, moe=moe)
    train_cfg = TrainConfig(steps=2, micro_batch=2, seq_len=16, eval_tokens=64, threads=1)
    train(model_cfg, train_cfg, root / "run", progress=False, log=lambda *a, **k: None)
    model, _, _ = load_trained(root / "run")
    ad.add_adapters(model, ad.LoRAConfig(r=2, target_modules=["q_proj", "up_proj"]))
    for _, layer in ad.adapter_layers(model):
        layer.lora_B.weight.data.normal_(0, 0.5)
    ad.save_adapters(model, root / "lora")
    return root


def test_build_eval_serve(experts, capsys, monkeypatch):
    out = experts / "coe"
    rc = main(["compose", "build", "--expert", f"base={experts / 'run'}", "--expert",
               f"variant={experts / 'run'}@{experts / 'lora'}", "--out", str(out), "--per-category", "4",
               "--mapping-per-category", "1", "--seq-len", "32"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "wrote" in printed and "python -> " in printed
    saved = json.loads((out / "compose.json").read_text())
    assert [e["name"] for e in saved["experts"]] == ["base", "variant"]
    assert set(saved["mapping"]) == {"python", "english", "german", "french", "russian", "japanese"}

    assert main(["compose", "eval", str(out), "--per-category", "1", "--seq-len", "32", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["requests"] == 6 and set(result["overall"]) == {"routed", "oracle", "base", "variant"}
    assert 0.0 <= result["router_accuracy"] <= 1.0
    for category, row in result["per_category"].items():
        assert row[saved["mapping"][category]] == row["oracle"]  # oracle routing = the mapped expert's own score

    monkeypatch.setattr("sys.stdin", io.StringIO("def main():\n" "Bonjour à tous\n" "\n"))
    assert main(["compose", "serve", str(out), "--max-new-tokens", "4", "--batch-size", "2"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 3 and all({"category", "expert", "confidence", "text"} <= set(r) for r in lines)
    assert all(r["expert"] in ("base", "variant") for r in lines)

    monkeypatch.setattr("sys.stdin", io.StringIO("import os\n"))
    assert main(["compose", "serve", str(out), "--score"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["bpb"] > 0


def test_usage_errors_are_one_line(experts, capsys, tmp_path):
    rc = main(["compose", "build", "--expert", f"base={experts / 'run'}", "--fallback", "nobody",
               "--out", str(tmp_path / "c")])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err == "moekit compose: --fallback 'nobody' is not one of the --expert names ['base']"
    assert main(["compose", "eval", str(tmp_path / "missing")]) == 2
    assert "is not a composition" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["compose", "build", "--expert", "no-equals-sign", "--out", str(tmp_path / "c")])
