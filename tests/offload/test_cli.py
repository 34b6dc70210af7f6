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


@pytest.mark.parametrize("budget, message", [
    ("-5%", "expert budget '-5%': a percentage must lie in (0, 100]; -5% leaves no room for any expert"),
    ("-512MB", "expert budget '-512MB' is negative; expected a percentage of all expert bytes"),
    # Before: a dash and a letter ('-inf', '-nan') still read as an unknown option, spelt apart.
    ("-inf", "expert budget '-inf' is negative; expected a percentage of all expert bytes"),
    ("-Infinity", "expert budget '-Infinity' is negative; expected a percentage of all expert bytes"),
    ("-nan", "expert budget '-nan': expected a percentage of all expert bytes"),  # NaN is not negative: malformed
    ("-inf%", "expert budget '-inf%': not a finite percentage; expected a percentage in (0, 100]"),
    ("-1e3", "expert budget '-1e3' is negative; expected a percentage of all expert bytes"),
])
@pytest.mark.parametrize("spelling", ["separate", "joined", "abbreviated"])
def test_negative_budgets_are_refused_as_budgets_in_either_spelling(tiny_run, capsys, budget, message, spelling):
    # Before: `--expert-budget -5%` read '-5%' as an unknown option ("expected one argument"); only
    # `--expert-budget=-5%` reached the budget's own check, and only once the model was loaded.
    # "abbreviated": argparse takes `--expert-bud 25%`; `--expert-bud -inf` still said "expected one argument".
    flag = {"separate": ["--expert-budget", budget], "joined": [f"--expert-budget={budget}"],
            "abbreviated": ["--expert-bud", budget]}[spelling]
    assert main(["generate", str(tiny_run), "--prompt", "a", "--max-new-tokens", "2", *flag]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"moekit generate: {message}") and err.count("\n") == 1
    # checked before the model is loaded: a missing run directory is not reached
    assert main(["generate", str(tiny_run / "absent"), "--prompt", "a", *flag]) == 2
    assert capsys.readouterr().err.startswith(f"moekit generate: {message}")


def test_only_a_number_after_the_budget_flag_is_taken_as_its_value(tiny_run, capsys):
    # `--expert-budget --policy lru` is a missing value (not the budget '--policy'); other flags are untouched.
    with pytest.raises(SystemExit) as exit_:  # an error in the command line itself, as argparse exits
        main(["generate", str(tiny_run), "--prompt", "a", "--expert-budget", "--policy", "lru"])
    assert exit_.value.code == 2
    assert "argument --expert-budget: expected one argument" in capsys.readouterr().err
    assert main(["generate", str(tiny_run), "--max-new-tokens", "2", "--expert-budget", "50%", "--prompt=-5"]) == 0


def test_static_without_a_hot_trace_is_refused(tiny_run, capsys):
    assert main(["generate", str(tiny_run), "--prompt", "a", "--max-new-tokens", "2", "--expert-budget", "50%",
                 "--policy", "static"]) == 2
    err = capsys.readouterr().err  # the flag to give, not the Python argument (hot_set=) it was
    assert err == ("moekit generate: --policy static needs a hot set; expected --hot-trace FILE (a routing trace, e.g. "
                   "OUT/trace.npz of `moekit analyze`)\n")
