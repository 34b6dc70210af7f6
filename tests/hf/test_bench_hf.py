"""`moekit bench hf` (moekit.bench.hf): a family that moekit does not wrap gets a `refused` line, not a crash."""

from __future__ import annotations

import importlib
import json
import types

import torch

import moekit.hf


def _bench():
    return importlib.import_module("moekit.bench.hf")


def test_a_refused_family_gets_a_refused_line(monkeypatch, capsys):
    bench = _bench()
    cfgs = bench.configs(32, 32, 4, 1, 64)
    assert {"gpt_oss", "llama4"} <= set(cfgs)

    def refuse(model, **kw):
        raise moekit.hf.UnsupportedBlockError("moekit.hf cannot wrap X: no reason")

    monkeypatch.setattr(bench.moekit.hf, "wrap", refuse)
    lines = bench.run_arch("gpt_oss", cfgs["gpt_oss"], types.SimpleNamespace())
    assert lines == [{"bench": "hf", "arch": "gpt_oss", "refused": "moekit.hf cannot wrap X: no reason"}]
    assert json.loads(capsys.readouterr().out.strip()) == lines[0]


def test_gpt_oss_and_llama4_are_timed_against_transformers(capsys):
    """Both families wrap now (issue 14 item 7): each gets a prefill and a decode line with the speed ratio,
    the best transformers implementation and wrapped = unwrapped logits."""
    bench = _bench()
    cfgs = bench.configs(32, 32, 4, 1, 64)
    args = types.SimpleNamespace(batch=1, seq=8, new_tokens=2, repeats=1, warmup=0, clock="cpu")
    for arch in ("gpt_oss", "llama4"):
        lines = bench.run_arch(arch, cfgs[arch], args)
        assert [line["case"] for line in lines] == ["prefill", "decode"]
        for line in lines:
            assert "refused" not in line and line["max_abs_logit_diff"] < 1e-4
            assert line["speedup_vs_hf"] > 0 and line["hf_best_impl"] in ("eager", "grouped_mm", "batched_mm")
            assert abs(line["speedup_vs_hf"] * line["ratio_hf"] - 1) < 1e-2 and line["clock"] == "cpu"
            q1, q2, q3 = line["speedup_vs_hf_rounds"]  # one round: its own ratio, the overall one
            assert q1 == q2 == q3 and abs(q2 - line["speedup_vs_hf"]) < 1e-3
            # the A/A control: a copy of transformers' model, never a candidate for the best implementation
            assert line["control_impl"] == ("eager" if arch == "llama4" else "grouped_mm")
            assert line["control_ratio"] > 0 and "tokens_per_s_hf_control" not in line
            assert abs(line["control_ratio_rounds"][1] - line["control_ratio"]) < 1e-3
            # the paths moekit's grouped GEMMs took in the case: two expert GEMMs per MoE call, forward only
            paths = line["moekit_gemm_paths"]
            assert paths and all(p.startswith("forward/") for p in paths), paths
            calls = 1 if line["case"] == "prefill" else args.new_tokens
            assert sum(paths.values()) == 2 * calls * line["moe_layers"], paths
    capsys.readouterr()


def test_cpu_clock_needs_one_thread(monkeypatch):
    bench = _bench()
    monkeypatch.setattr(bench.torch, "get_num_threads", lambda: 2)
    try:
        bench.main(["--clock", "cpu", "--archs", "mixtral"])
    except SystemExit as e:
        assert "--clock cpu times one thread; this process runs 2" in str(e)
    else:
        raise AssertionError("--clock cpu ran with two threads")


def test_round_quartiles():
    bench = _bench()
    assert bench._quartiles([2.0]) == (2.0, 2.0, 2.0)
    assert bench._quartiles([1.0, 2.0, 3.0, 4.0, 5.0]) == (2.0, 3.0, 4.0)


def test_every_variant_reads_the_same_weight_tensors():
    """Separate copies of one model differ by up to 5 % in speed where their pages lie (the A/A control); the
    benchmark's variants share every Parameter and buffer, so only their code differs."""
    bench = _bench()
    base = bench.build(bench.configs(32, 32, 4, 1, 64)["mixtral"])
    ids = torch.randint(3, 64, (1, 8))
    variants, _ = bench.hf_variants(base, ids)
    wrapped = bench.moekit.hf.wrap(bench.sharing_copy(base))
    originals = {id(t) for t in (*base.parameters(), *base.buffers())}
    assert {"eager", "grouped_mm"} <= set(variants)
    for m in (*variants.values(), wrapped, bench.sharing_copy(variants["grouped_mm"])):
        assert m is not base and all(id(p) in originals for p in m.parameters())
        assert all(id(b) in originals for n, b in m.named_buffers() if n in dict(base.named_buffers()))
    # settings stay each copy's own
    assert variants["grouped_mm"].config._experts_implementation == "grouped_mm"
    assert variants["eager"].config._experts_implementation == "eager"
