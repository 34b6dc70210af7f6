"""What the training commands print and write is true: the compare table is a Markdown table,
--help shows the chosen preset, `moekit eval` reproduces training's own evaluation, dynamic routers
report measured active parameters, the unigram column is explained, the README's export claim
holds, and progress without a terminal stays a few plain lines."""

import json
import re
import sys
from pathlib import Path

import pytest

from moekit.cli import main
from moekit.hf.export import ExportError, hf_config_for
from moekit.train import train
from moekit.train.evaluate import measured_active_params
from moekit.train.presets import PRESETS, preset

sys.path.insert(0, str(Path(__file__).parents[1] / "train"))
from test_trainer import quick, tiny  # noqa: E402  (the canonical tiny run)

ROOT = Path(__file__).parents[2]
TINY = ["--model.d_model", "32", "--model.n_layers", "2", "--model.n_heads", "2", "--moe.d_expert", "32",
        "--moe.num_experts", "4", "--train.steps", "3", "--train.micro_batch", "2", "--train.seq_len", "16",
        "--train.eval_tokens", "64", "--train.threads", "1", "--no-progress"]


def cells(line: str) -> list[str]:
    assert line.startswith("|") and line.endswith("|"), line
    return [c.strip() for c in line[1:-1].split("|")]


def test_compare_md_is_a_markdown_table(tmp_path):
    out = tmp_path / "cmp"
    assert main(["compare", "--presets", "topk,topp", "--out", str(out), *TINY]) == 0
    table = [line for line in (out / "compare.md").read_text().splitlines() if line.startswith("|")]
    header, delimiter, *rows = table
    assert len(cells(delimiter)) == len(cells(header)) and set(cells(delimiter)) == {"---"}
    assert len(rows) == 2 and all(len(cells(r)) == len(cells(header)) for r in rows)
    report = json.loads((out / "compare.json").read_text())
    col = cells(header).index("active/token (measured)")
    assert [cells(r)[col] for r in rows] == [f"{r['active_params']:,}" for r in report["runs"].values()]
    assert "unigram = bits per byte of a byte-frequency model" in (out / "compare.md").read_text()


@pytest.mark.parametrize("name", ["topk", "null", "deepseek"])
def test_train_help_shows_the_chosen_presets_values(capsys, name):
    with pytest.raises(SystemExit) as e:
        main(["train", "--preset", name, "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    model_cfg, train_cfg = preset(name)
    assert re.search(rf"--router\.kind {{[a-z_,]+}} [^-]*\(preset {name}: {model_cfg.moe.router.kind!r}\)", text)
    assert re.search(rf"--moe\.num_experts int [^-]*\(preset {name}: {model_cfg.moe.num_experts}\)", text)
    assert re.search(rf"--train\.steps int [^-]*\(preset {name}: {train_cfg.steps}\)", text)
    assert "class default" not in text


def test_eval_defaults_to_the_runs_own_evaluation_and_says_so(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), *TINY]) == 0
    capsys.readouterr()
    trained = json.loads((run / "eval.json").read_text())
    assert main(["eval", str(run), "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["loss"] == trained["loss"] and evaluated["eval_tokens"] == trained["eval_tokens"] == 64
    assert main(["eval", str(run)]) == 0
    table = capsys.readouterr().out
    assert "evaluated 64 tokens per domain (at most) in windows of 16" in table
    assert "unigram = bits per byte of a byte-frequency model fitted on the train split" in table


def test_dynamic_routers_report_measured_active_parameters(tmp_path, capsys):
    log = []
    cfg = tiny("topp", p=0.5)
    result = train(cfg, quick(steps=4), tmp_path / "run", progress=False, log=log.append)
    measured = measured_active_params(cfg, result["experts_per_token_by_layer"])
    assert result["active_params"] == measured < cfg.num_active_params() == result["active_params_config"]
    assert f"{measured:,} active parameters per token (measured)" in log[-2]
    assert main(["eval", str(tmp_path / "run")]) == 0
    assert f"active parameters per token: {measured:,} measured" in capsys.readouterr().out


def test_the_readme_names_the_presets_moekit_export_accepts():
    exportable = []
    for name, make in PRESETS.items():
        try:
            hf_config_for(make().validate())
            exportable.append(name)
        except ExportError:
            pass
    readme = (ROOT / "README.md").read_text()
    line = re.search(r"Presets `moekit export` accepts: (.*?)\.", readme)
    assert line, "README must say which presets can be exported"
    assert sorted(re.findall(r"`(\w+)`", line[1])) == sorted(exportable)


def test_progress_without_a_terminal_is_a_few_plain_lines(tmp_path, capsys):
    train(tiny(), quick(steps=30, checkpoint_every=100), tmp_path / "run", progress=True, log=lambda *_: None)
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    assert 3 <= len(lines) <= 11 and lines[-1].startswith("train step 30/30: loss ")
