"""`moekit generate RUN --expert-budget ... --policy ...` through moekit.cli."""

from __future__ import annotations

import json

import pytest

from moekit.cli import main


def test_generate_with_an_expert_budget_prints_the_same_text(tiny_run, tmp_path, capsys):
    run = str(tiny_run)
    common = ["generate", run, "--prompt", "def f(x):", "--max-new-tokens", "12"]
    assert main(common) == 0
    resident = capsys.readouterr().out
    out_json = tmp_path / "m.json"
    assert main([*common, "--expert-budget", "50%", "--policy", "predictive", "--offload-json", str(out_json)]) == 0
    captured = capsys.readouterr()
    assert captured.out == resident
    assert "tokens/s" in captured.err and "set-MIN" in captured.err and "equals the measured" in captured.err
    m = json.loads(out_json.read_text())
    assert m["policy"] == "predictive" and m["budget_fraction"] == pytest.approx(0.5)
    assert m["simulated"]["hit_flags_equal_measured"] is True
    assert (tiny_run / "expert-store" / "manifest.json").is_file()
    # Static with a hot set from a trace file, and a shared cache.
    import torch

    from moekit.analysis import record_trace, save_trace
    from moekit.analysis.trace import TokenBatch
    from moekit.train import load_trained

    model, _, _ = load_trained(tiny_run)
    trace = record_trace(model, [TokenBatch(torch.randint(0, 200, (2, 32), generator=torch.Generator().manual_seed(0)))])
    save_trace(trace, tmp_path / "hot.trace")
    assert main([*common, "--expert-budget", "75%", "--policy", "static", "--cache-scope", "shared",
                 "--hot-trace", str(tmp_path / "hot.trace")]) == 0
    assert capsys.readouterr().out == resident


@pytest.mark.parametrize("budget, message", [("0%", "leaves no room"), ("12 parsecs", "expected a percentage")])
def test_bad_budgets_exit_with_status_2(tiny_run, capsys, budget, message):
    assert main(["generate", str(tiny_run), "--prompt", "a", "--max-new-tokens", "2", "--expert-budget", budget]) == 2
    assert message in capsys.readouterr().err


def test_static_without_a_hot_trace_is_refused(tiny_run, capsys):
    assert main(["generate", str(tiny_run), "--prompt", "a", "--max-new-tokens", "2", "--expert-budget", "50%",
                 "--policy", "static"]) == 2
    err = capsys.readouterr().err  # the flag to give, not the Python argument (hot_set=) it was
    assert err == ("moekit generate: --policy static needs a hot set; expected --hot-trace FILE (a routing trace, e.g. "
                   "OUT/trace.npz of `moekit analyze`)\n")
