"""compute_metrics on hand-made traces with known answers, analyze() outputs, and the CLI."""

import argparse
import json
import math
import re

import numpy as np
import pytest

from moekit.analysis import RoutingTrace, affinity, affinity_prefetch_recall, gate_prefetch_recall, save_trace
from moekit.analysis.cli import add_arguments, run
from moekit.analysis.report import AnalysisConfig, analyze, compute_metrics
from moekit.analysis.tracefile import TraceFormatError

SMALL = AnalysisConfig(srp_n=(2, 8), n_boot=20, sch_n=(2, 4), model_sch_n=(4,), max_multiple=4,
                       model_multiples=(1, 2), prefetch_distance=2, workers=1)


def metrics(trace: RoutingTrace, **kw) -> dict:
    cfg = AnalysisConfig(**{**SMALL.__dict__, **kw})
    return compute_metrics(trace, cfg, progress=False)


def test_perfectly_balanced():
    E, L, T = 4, 2, 40
    cyc = (np.arange(T) % E)[:, None]  # each layer cycles 0, 1, 2, 3, 0, ...
    trace = RoutingTrace([np.stack([cyc] * L)] * 2, E, ["a", "b"])
    m = metrics(trace)
    assert m["load"]["cv_L"] == [0.0, 0.0] and m["load"]["norm_entropy_L"] == [1.0, 1.0]
    assert all(abs(g) < 1e-9 for g in m["load"]["gini_L"])
    assert m["experts_per_token"]["mean_L"] == [1.0, 1.0] and m["trace"]["capacity_unit_k"] == 1
    lru = m["cache"]["per_layer"]["policies"]["lru"]["cold"]  # C = 1..4
    # A cyclic scan thrashes LRU until all E experts fit; then only the 4 first touches miss.
    assert lru[:3] == [0.0, 0.0, 0.0] and lru[3] == pytest.approx((2 * T - E) / (2 * T))
    # Belady on a cycle of E with C experts keeps C-1 of them: hits (C-1)/(E-1) of the non-first requests.
    for C in (2, 3):
        smin = m["cache"]["per_layer"]["policies"]["set_min"]["cold"][C - 1]
        assert smin == pytest.approx(((2 * T - E) * (C - 1) / (E - 1)) / (2 * T), abs=0.02)
    assert m["specialisation"]["mean_pairwise_js_L"] == [0.0, 0.0]


def test_one_hot_collapsed():
    E, L, T = 8, 3, 30
    trace = RoutingTrace([np.zeros((L, T, 1), dtype=np.int64)] * 3, E, ["x", "y", "x"])
    m = metrics(trace)
    assert m["load"]["gini_L"] == [pytest.approx((E - 1) / E)] * L
    assert m["load"]["cv_L"] == [pytest.approx(math.sqrt(E - 1))] * L
    assert m["load"]["max_over_mean_L"] == [pytest.approx(E)] * L
    requests = 3 * T
    for label, v in m["cache"]["per_layer"]["policies"].items():
        # one expert: only its first touch misses, at every capacity, for every policy
        assert v["cold"] == [pytest.approx((requests - 1) / requests)] * 4, label
        assert v["warm"] == [1.0] * 4, label
    for n in ("2", "8"):
        assert m["srp"]["model"][n]["value"] == 1.0 and m["srp"]["layer"][n]["value_L"] == [1.0] * L
    A = np.array(m["affinity"]["A_JEE"])
    assert A[:, 0, 0].tolist() == [1.0] * (L - 1) and A[:, 1:].sum() == 0
    assert m["prefetch"]["affinity"]["1"][1:] == [1.0] * (L - 1) and m["prefetch"]["affinity"]["1"][0] is None
    assert m["prefetch"]["gate"] is None
    assert m["hot_set"]["per_layer"]["bound"] == [1.0] * 4


def test_two_disjoint_domains():
    E, L, T = 4, 2, 16
    rng = np.random.default_rng(0)

    def seq(experts):
        return np.stack([rng.choice(experts, size=(T, 1)) for _ in range(L)])

    trace = RoutingTrace([seq([0, 1]), seq([2, 3]), seq([0, 1]), seq([2, 3])], E, ["code", "de", "code", "de"])
    m = metrics(trace)
    spec = m["specialisation"]
    assert spec["domains"] == ["code", "de"]
    assert spec["mean_pairwise_js_L"] == [pytest.approx(math.log(2))] * L
    dist = np.array(spec["dist_GLE"])
    assert dist[0, :, 2:].sum() == 0 and dist[1, :, :2].sum() == 0
    np.testing.assert_allclose(dist.sum(axis=2), 1.0)


def test_affinity_distances_and_prefetch_recall():
    E, T = 6, 50
    first = np.random.default_rng(1).integers(0, E, size=(T, 1))
    seq = np.stack([(first + j) % E for j in range(4)])  # layer j uses expert (e0 + j) mod E
    trace = RoutingTrace([seq, seq], E)
    for d in (1, 2, 3):
        A = affinity(trace, distance=d)
        assert A.shape == (4 - d, E, E)
        np.testing.assert_allclose(A[0], np.roll(np.eye(E), d, axis=1))
    recall = affinity_prefetch_recall(trace, 3)
    for d in (1, 2, 3):
        assert np.isnan(recall[d][:d]).all() and np.all(recall[d][d:] == 1.0)
    with pytest.raises(ValueError, match="distance"):
        affinity(trace, distance=0)


def test_gate_prefetch_recall_by_hand():
    actual = np.array([[[0, 1], [2, -1]], [[1, 2], [3, -1]]])  # (L=2, T=2, K=2)
    pred = np.array([[[-1, -1], [-1, -1]], [[2, 0], [1, -1]]])  # layer 1: {2,0} vs {1,2}; {1} vs {3}
    trace = RoutingTrace([actual], 4, prefetch={1: [pred]})
    r = gate_prefetch_recall(trace)[1]
    assert np.isnan(r[0]) and r[1] == pytest.approx(1 / 3)


def test_workers_give_the_same_numbers():
    rng = np.random.default_rng(3)
    seqs = [np.argsort(rng.random((3, 40, 8)), axis=2)[:, :, :2] for _ in range(6)]
    trace = RoutingTrace(seqs, 8, ["a", "b"] * 3)
    one, two = metrics(trace, workers=1), metrics(trace, workers=2)
    for m in (one, two):
        m.pop("timing_s")
        m["config"].pop("workers")
    assert one == two


def test_analyze_writes_report_and_json(tmp_path):
    rng = np.random.default_rng(4)
    seqs = [np.argsort(rng.random((3, 30, 6)), axis=2)[:, :, :2] for _ in range(4)]
    trace = RoutingTrace(seqs, 6, ["p", "q", "p", "q"], meta={"routers": ["topk(k=2)"]})
    m = analyze(trace, tmp_path / "out", SMALL, progress=False)
    text = (tmp_path / "out" / "metrics.json").read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"metrics.json contains {c}"))
    assert json.loads(text)["trace"]["num_rows"] == m["trace"]["num_rows"] == 3 * 120
    page = (tmp_path / "out" / "report.html").read_text()
    ids = re.findall(r'<img class="plot" id="plot-([a-z_]+)"[^>]*src="data:image/png;base64,', page)
    assert sorted(ids) == sorted(["load", "experts_per_token", "specialisation", "cache", "srp", "affinity",
                                  "prefetch"])
    assert not re.search(r"(src|href)=[\"']?(https?:)?//", page), "the report must not load anything remote"
    assert "<script" not in page


def test_cli(tmp_path, capsys):
    rng = np.random.default_rng(5)
    trace = RoutingTrace([np.argsort(rng.random((2, 20, 5)), axis=2)[:, :, :1] for _ in range(3)], 5)
    path = save_trace(trace, tmp_path / "r.trace")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([str(path), "--out", str(tmp_path / "rep"), "--workers", "1", "--srp-n", "2,4",
                              "--boot", "10", "--model-multiples", "1,2", "--no-progress"])
    assert run(args) == 0
    assert (tmp_path / "rep" / "report.html").is_file() and (tmp_path / "rep" / "metrics.json").is_file()
    assert "wrote" in capsys.readouterr().out
    (tmp_path / "bad.trace").write_bytes(b"not a zip at all")
    bad = parser.parse_args([str(tmp_path / "bad.trace"), "--out", str(tmp_path / "x"), "--no-progress"])
    with pytest.raises(TraceFormatError, match="truncated or not a routing trace"):
        run(bad)  # moekit.cli.main prints it as one line (tests/robustness/test_io_cli.py)
    assert not (tmp_path / "x").exists()
    with pytest.raises(SystemExit):
        parser.parse_args([str(path), "--out", "x", "--srp-n", "0,4"])


def test_sch_is_the_papers_and_set_min_is_not_called_its_bound():
    """Issue 11's example in the report: E = 3, tokens [2] [0, 1] [2]. k = round(4/3) = 1, so C/k = 1 is
    below the 2 experts of token 1: LRU and set-MIN have no value there, SCH has one; at C = 2 SCH(2)
    hits 1 of 4 (0.25 cold / 0.75 warm) where set-MIN hits none."""
    trace = RoutingTrace([np.array([[[2, -1], [0, 1], [2, -1]]])], 3)
    m = metrics(trace)
    pol = m["cache"]["per_layer"]["policies"]
    assert m["cache"]["per_layer"]["C"][:2] == [1, 2]
    assert pol["lru"]["cold"][0] is None and pol["set_min"]["cold"][0] is None
    assert pol["sch2"]["cold"][0] is not None
    assert (pol["sch2"]["cold"][1], pol["sch2"]["warm"][1]) == (0.25, 0.75)
    assert pol["set_min"]["cold"][1] == 0.0 < pol["sch2"]["cold"][1] <= pol["bypass_min"]["cold"][1]
    bounds = m["cache"]["conventions"]["bounds"]
    assert "SCH" in bounds and "can exceed set-MIN" in bounds
    assert "k_max" in m["cache"]["conventions"]["missing"]
    whole = m["cache"]["whole_model"]["policies"]["sch4"]  # one step per token over every layer
    assert whole["cold"][0] is not None
