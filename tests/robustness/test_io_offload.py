"""`moekit offload RUN|--hf DIR OUT` and `--expert-budget` (issue 11 item 19, issue 12 item 6): the
store command writes a checksummed, atomic store that generation reuses; a budget means the same on
the command line, in Python and in docs/offload.md, and is checked before anything is written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from moekit.cli import main
from moekit.errors import UsageError
from moekit.offload import ExpertStore, offloaded_generate, parse_budget
from moekit.utils.io import marker_kind

from .io_support import snapshot

DOCS = Path(__file__).resolve().parents[2] / "docs" / "offload.md"


def test_offload_command_writes_a_store_that_generate_reuses(io_run, tmp_path, capsys):
    out = tmp_path / "store"
    assert main(["offload", str(io_run), str(out)]) == 0
    said = capsys.readouterr().out
    assert f"wrote {out}: 2 MoE layers x 4 experts" in said and f"--expert-store {out}" in said
    assert marker_kind(out) == "store"
    with ExpertStore(out, verify="always") as st:
        st.verify_all()  # every expert against its sha256
        assert st.manifest["source"]["kind"] == "moekit-run"
    stamp = (out / "manifest.json").stat().st_mtime_ns
    gen = ["generate", str(io_run), "--prompt", "def f(", "--max-new-tokens", "6"]
    assert main(gen) == 0
    resident = capsys.readouterr().out
    assert main([*gen, "--expert-budget", "50%", "--expert-store", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.out == resident
    assert "writing the expert store" not in captured.err  # reused: written from this very checkpoint
    assert (out / "manifest.json").stat().st_mtime_ns == stamp
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "store"]  # nothing temporary left


def test_offload_command_rewrites_its_own_store(io_run, tmp_path, capsys):
    out = tmp_path / "store"
    assert main(["offload", str(io_run), str(out)]) == 0
    (out / "layer-000.safetensors").write_bytes(b"damaged")
    assert main(["offload", str(io_run), str(out)]) == 0
    with ExpertStore(out) as st:
        st.verify_all()


def test_offload_command_for_a_transformers_checkpoint(tmp_path, capsys):
    from transformers import OlmoeConfig, OlmoeForCausalLM

    torch.manual_seed(0)
    cfg = OlmoeConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, eos_token_id=257,
                      pad_token_id=258, bos_token_id=256)
    hf_dir = tmp_path / "olmoe"
    OlmoeForCausalLM(cfg).save_pretrained(hf_dir)
    out = tmp_path / "store"
    assert main(["offload", "--hf", str(hf_dir), str(out)]) == 0
    with ExpertStore(out) as st:
        assert st.num_layers == 2 and st.num_experts == 4 and st.manifest["dense"] is None
        assert st.manifest["source"] == {"kind": "hf", "path": str(hf_dir.resolve())}
    capsys.readouterr()
    gen = ["generate", "--hf", str(hf_dir), "--prompt", "abc", "--max-new-tokens", "4"]
    assert main([*gen, "--expert-budget", "50%", "--expert-store", str(out)]) == 0
    assert "writing the expert store" not in capsys.readouterr().err


def test_python_api_checks_the_budget_before_writing_a_store(io_run):
    before = snapshot(io_run)
    with pytest.raises(UsageError, match="less than one byte; for a fraction of the experts write '25%'"):
        offloaded_generate(io_run, [[1, 2, 3]], 2, budget=0.25)
    with pytest.raises(UsageError, match="less than one byte"):
        offloaded_generate(io_run, [[1, 2, 3]], 2, budget="0.25")
    with pytest.raises(UsageError, match="one token needs"):
        offloaded_generate(io_run, [[1, 2, 3]], 2, budget=100)
    assert snapshot(io_run) == before  # RUN/expert-store was never written


def documented_budgets() -> list[tuple[str, str]]:
    """The rows of the budget table in docs/offload.md: (example, meaning)."""
    text = DOCS.read_text()
    table = text[text.index("<!-- budget-table -->"):text.index("<!-- /budget-table -->")]
    return re.findall(r"^\| `([^`]+)` \| ([^|]+) \|", table, flags=re.M)


def test_the_documented_budgets_mean_what_the_docs_say():
    total = 2**30  # the docs' table is for 1 GiB of experts
    rows = documented_budgets()
    assert len(rows) >= 6
    for example, meaning in rows:
        refused = re.match(r"refused", meaning.strip())
        for form in (example, *([float(example)] if re.fullmatch(r"[\d.e]+", example) else [])):
            if refused:
                with pytest.raises(UsageError):
                    parse_budget(form, total)
            else:
                assert parse_budget(form, total) == int(meaning.split()[0].replace(",", "")), (form, meaning)


def test_the_command_line_help_gives_the_same_rule(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "'25%'" in help_text and "'512MB'" in help_text and "a bare number is a whole number of bytes" in help_text
