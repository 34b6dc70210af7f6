import pytest
import torch

import moekit
from moekit.cli import main
from moekit.models import LMConfig, MoELM
from moekit.train import TrainConfig, load_trained, save_trained


@pytest.fixture(scope="module")
def byte_run(tmp_path_factory):
    """An untrained byte-level run (vocab 259, 2 MoE layers of 8 experts) saved as `moekit train` would."""
    torch.manual_seed(0)
    moe = moekit.MoEConfig(d_model=32, d_expert=32, num_experts=8, router=moekit.RouterConfig(kind="topk", k=2))
    model = MoELM(LMConfig(vocab_size=259, d_model=32, n_layers=2, n_heads=2, max_seq_len=64, moe=moe))
    run = tmp_path_factory.mktemp("compress") / "run"
    save_trained(model, TrainConfig(seq_len=32, eval_tokens=64), run, what="test")
    return run


def test_compress_eval_generate_on_the_result(byte_run, tmp_path, capsys):
    out = tmp_path / "small"
    rc = main(["compress", str(byte_run), "--prune", "0.5", "--per-layer", "--quantize", "int4", "--group-size", "16",
               "--calib", "python,german", "--calib-tokens", "64", "--out", str(out), "--no-progress"])
    text = capsys.readouterr().out
    assert rc == 0
    assert "pruned 8 of 16 experts in" in text and "int4 on" in text and "expert bytes:" in text
    model, _, _ = load_trained(out)
    assert sum(m.router.num_experts for m in model.moe_layers()) == 8
    assert main(["eval", str(out), "--tokens", "64", "--json"]) == 0
    assert '"bpb"' in capsys.readouterr().out
    assert main(["generate", str(out), "--prompt", "ab", "--max-new-tokens", "3"]) == 0


def test_compress_errors_are_one_line(byte_run, tmp_path, capsys):
    assert main(["compress", str(byte_run), "--out", str(tmp_path / "a")]) == 2
    assert "nothing to do" in capsys.readouterr().err
    assert main(["compress", str(byte_run), "--quantize", "int5", "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--quantize 'int5' is invalid" in err
    assert main(["compress", str(byte_run), "--prune", "0.5", "--calib", "klingon", "--out", str(tmp_path / "c")]) == 2
    assert "'klingon'" in capsys.readouterr().err
    assert main(["compress", "--prune", "0.5", "--out", str(tmp_path / "d")]) == 2
    assert "give exactly one of RUN and --hf DIR" in capsys.readouterr().err
    assert main(["compress", str(byte_run), "--hf", str(tmp_path), "--prune", "0.5", "--out", str(tmp_path / "d")]) == 2
    assert "give exactly one of RUN and --hf DIR" in capsys.readouterr().err
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


@pytest.mark.parametrize("kind", ["int8", "mixed", "merged"])
def test_a_compressed_run_generates_offloaded_from_its_compressed_store(byte_run, tmp_path, capsys, kind):
    """One width, mixed widths (int4 and int8 experts: a store of per-expert sizes) and merged layers
    (a store of the bank's experts, router ids mapped) all generate offloaded as they do resident."""
    step = {"int8": ["--quantize", "int8", "--no-protect-super", "--group-size", "16"],
            "mixed": ["--quantize", "mixed:6", "--group-size", "16"],
            "merged": ["--merge", "m-smoe"]}[kind]
    out = tmp_path / "q"
    assert main(["compress", str(byte_run), *step, "--calib", "python", "--calib-tokens", "64", "--out", str(out),
                 "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["generate", str(out), "--prompt", "ab", "--max-new-tokens", "4", "--expert-budget", "50%"]) == 0
    offloaded = capsys.readouterr().out
    assert main(["generate", str(out), "--prompt", "ab", "--max-new-tokens", "4"]) == 0
    resident = capsys.readouterr().out
    assert resident.strip() and resident.strip() in offloaded  # the same text, token for token
    from moekit.offload import ExpertStore

    with ExpertStore(out / "expert-store") as store:
        if kind == "int8":
            assert store.quantization == {"bits": 8, "group_size": 16}
        elif kind == "mixed":
            assert sorted(store.layouts) == ["int4", "int8"] and store.manifest["version"] == 4
            assert len({s for row in store.expert_nbytes_LE for s in row}) == 2
        else:
            assert all(m is not None and len(m) == 8 for m in store.expert_maps)
            assert store.experts_per_layer == [4, 4]


def test_the_command_lines_choices_are_the_librarys():
    from moekit.cli import compress as compress_cli
    from moekit.compress.merge import METHODS
    from moekit.compress.prune import CRITERIA

    assert compress_cli.CRITERIA == CRITERIA and compress_cli.METHODS == METHODS


@pytest.mark.slow  # ~11 s: trains two steps and evaluates
def test_a_pruned_run_resumes_training(byte_run, tmp_path, capsys):
    out = tmp_path / "small"
    assert main(["compress", str(byte_run), "--prune", "0.5", "--per-layer", "--calib", "python", "--calib-tokens", "64", "--out", str(out),
                 "--no-progress"]) == 0
    before, _, _ = load_trained(out)
    counts = [m.experts.num_experts for m in before.moe_layers()]
    capsys.readouterr()
    # a new schedule from the compressed weights: train settings may change, the model may not
    assert main(["train", "--resume", "--out", str(out), "--train.steps", "2", "--train.micro_batch", "2",
                 "--train.eval_tokens", "32", "--train.warmup_steps", "1", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "fine-tuning the compressed model" in text
    after, cfg, _ = load_trained(out)
    assert cfg.steps == 2 and [m.experts.num_experts for m in after.moe_layers()] == counts
    moved = [not torch.equal(a, b) for a, b in zip(before.parameters(), after.parameters(), strict=True)]
    assert any(moved)  # it trained
    # a later resume is an ordinary one (optimiser state of step 2)
    assert main(["train", "--resume", "--out", str(out), "--train.steps", "3", "--no-progress"]) == 2
    assert "trained with other settings" in capsys.readouterr().err


@pytest.mark.parametrize(("step", "why"), [(["--quantize", "int8", "--group-size", "16"], "take no gradient"),
                                         (["--merge", "m-smoe"], "merged experts")])
def test_a_quantised_or_merged_run_refuses_to_train_in_one_line(byte_run, tmp_path, capsys, step, why):
    out = tmp_path / "q"
    assert main(["compress", str(byte_run), *step, "--calib", "python", "--calib-tokens", "64", "--out", str(out),
                 "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and why in err


@pytest.mark.slow  # ~10 s: records a trace and runs the report's simulations
def test_analyze_reads_a_run_pruned_per_layer_and_quantised(byte_run, tmp_path, capsys):
    out = tmp_path / "small"
    assert main(["compress", str(byte_run), "--prune", "0.5", "--per-layer", "--quantize", "mixed:4", "--group-size",
                 "16", "--calib", "python", "--calib-tokens", "64", "--out", str(out), "--no-progress"]) == 0
    counts = [m.router.num_experts for m in load_trained(out)[0].moe_layers()]
    assert len(set(counts)) > 1
    assert main(["analyze", str(out), "--out", str(tmp_path / "rep"), "--samples-per-domain", "1", "--seq-len", "32",
                 "--workers", "1", "--boot", "10", "--no-progress"]) == 0
    from moekit.analysis.tracefile import load_trace

    trace = load_trace(tmp_path / "rep" / "trace.npz")
    assert trace.num_layers == 2 and trace.num_experts == max(counts)


def test_compare_evaluates_a_run_and_its_compressed_form_on_the_same_windows(byte_run, tmp_path, capsys):
    import json

    from moekit.train import evaluate

    small = tmp_path / "small"
    assert main(["compress", str(byte_run), "--prune", "0.5", "--calib", "python", "--calib-tokens", "64",
                 "--out", str(small), "--no-progress"]) == 0
    capsys.readouterr()
    out = tmp_path / "cmp"
    assert main(["compare", "--runs", f"{byte_run},{small}", "--out", str(out)]) == 0
    assert "| small |" in capsys.readouterr().out
    report = json.loads((out / "compare.json").read_text())
    assert list(report["runs"]) == ["run", "small"] and report["evaluated_only"]
    for name, run in (("run", byte_run), ("small", small)):
        model, cfg, tok = load_trained(run)
        want = evaluate(model, tok, cfg.seq_len, cfg.eval_tokens)  # the windows of the first run: equal settings here
        row = report["runs"][name]
        assert row["val_bpb"] == pytest.approx(want["bpb"], rel=1e-6)
        assert row["experts_per_token"] == pytest.approx(want["experts_per_token"])
    assert report["runs"]["small"]["params"] < report["runs"]["run"]["params"]  # 4 of 8 experts per layer
    assert (out / "compare.md").is_file()
    # training flags make no sense for existing runs; duplicate row names neither: one line each
    assert main(["compare", "--runs", f"{byte_run},{small}", "--seeds", "2", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "--seeds" in err and err.strip().count("\n") <= 1
    assert main(["compare", "--runs", f"{byte_run},{byte_run}", "--out", str(tmp_path / "y")]) == 2
    assert "distinct run directories" in capsys.readouterr().err
