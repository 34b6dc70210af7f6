"""`moekit compare` sweeps and seeds: variant expansion and the per-setting summary (Pareto front)."""

import pytest

from moekit.cli.compare import sweep_variants
from moekit.cli.flags import parse_sweep
from moekit.errors import UsageError
from moekit.train.compare import summarise_groups
from moekit.train.presets import preset


def test_each_preset_is_swept_over_the_fields_it_has_times_the_seeds():
    base = {name: preset(name) for name in ("topk", "topp")}
    variants, groups = sweep_variants(base, [parse_sweep("router.p=0.2,0.4"), parse_sweep("router.k=1,3")], seeds=2)
    assert list(groups.values()).count("topk-k1") == 2 and "topk-k3-s1" in variants
    assert {g for g in groups.values() if g.startswith("topp")} == {"topp-p0.2", "topp-p0.4"}
    assert len(variants) == 2 * 2 + 2 * 2
    m, t = variants["topp-p0.4-s1"]
    assert m.moe.router.p == 0.4 and t.seed == base["topp"][1].seed + 1
    assert variants["topk-k3-s0"][0].moe.router.k == 3
    assert sweep_variants(base, [], seeds=1)[1] == {"topk": "topk", "topp": "topp"}


@pytest.mark.parametrize("spec, message", [
    ("router.p", "expected SECTION.FIELD=V1,V2"),
    ("nope.p=1", "unknown section 'nope'"),
    ("router.kind=topk,topp", "not a field that can be swept"),
    ("train.lr=0.1,x", "expected float"),
    ("train.lr=0.1,0.1", "a value is repeated"),
])
def test_bad_sweeps_are_one_line(spec, message):
    with pytest.raises(UsageError, match=message):
        parse_sweep(spec)


def test_seeds_below_one_and_unmatched_sweeps_are_refused():
    base = {"topk": preset("topk")}
    with pytest.raises(UsageError, match="--seeds 0"):
        sweep_variants(base, [], seeds=0)
    with pytest.raises(UsageError, match="no preset among topk has this field"):
        sweep_variants(base, [parse_sweep("router.p=0.3")])


def test_summary_gives_mean_sample_std_and_the_pareto_front():
    rows = {"a-s0": {"val_bpb": 2.0, "experts_per_token": 1.0, "active_params": 10},
            "a-s1": {"val_bpb": 2.2, "experts_per_token": 1.0, "active_params": 10},
            "b": {"val_bpb": 1.9, "experts_per_token": 2.0, "active_params": 20},
            "c": {"val_bpb": 2.05, "experts_per_token": 2.5, "active_params": 30}}  # worse than b on both
    s = summarise_groups(rows, {"a-s0": "a", "a-s1": "a", "b": "b", "c": "c"})
    assert s["a"]["val_bpb"]["mean"] == pytest.approx(2.1)
    assert s["a"]["val_bpb"]["std"] == pytest.approx(0.1414213562)
    assert s["b"]["val_bpb"]["std"] is None  # one run: no spread
    assert [g for g, v in s.items() if v["pareto"]] == ["a", "b"]


def _compare_dir(root, name, runs, steps=150):
    """A compare directory as `moekit compare` leaves it (compare.json only: merge reads nothing else)."""
    import json

    d = root / name
    d.mkdir()
    rows = {r: {"group": g, "seed": s, "router": "topk(k=1)", "params": 20, "active_params": 10, "val_loss": 1.0,
                "val_bpb": b, "bpb_by_domain": {"python": b}, "experts_per_token": k,
                "experts_per_token_by_layer": [k], "experts_per_token_by_domain": {"python": k}, "tokens_per_s": 1.0}
            for r, (g, s, b, k) in runs.items()}
    train = {"steps": steps, "micro_batch": 2, "grad_accum": 1, "seq_len": 8, "tokenizer": "bpe"}
    (d / "compare.json").write_text(json.dumps({"train": train, "seeds": [],
                                                "unigram_bpb": 5.5, "runs": rows, "groups": {}}))
    return d


def test_merge_tabulates_parts_as_one_compare(tmp_path):
    import json

    from moekit.cli import main

    a = _compare_dir(tmp_path, "a", {"x-s0": ("x", 0, 2.0, 1.0), "x-s1": ("x", 1, 2.2, 1.0)})
    b = _compare_dir(tmp_path, "b", {"x-s2": ("x", 2, 2.4, 1.0), "y-s0": ("y", 0, 1.9, 2.0)})
    assert main(["compare", "--merge", f"{a},{b}", "--out", str(tmp_path / "all")]) == 0
    report = json.loads((tmp_path / "all" / "compare.json").read_text())
    assert list(report["runs"]) == ["x-s0", "x-s1", "x-s2", "y-s0"] and report["seeds"] == [0, 1, 2]
    assert report["groups"]["x"]["runs"] == ["x-s0", "x-s1", "x-s2"]
    assert report["groups"]["x"]["val_bpb"]["mean"] == pytest.approx(2.2)
    assert report["groups"]["x"]["val_bpb"]["std"] == pytest.approx(0.2)
    assert report["merged_from"] == [str(a), str(b)]
    assert (tmp_path / "all" / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert "| x | 3 | 2.2000 ± 0.2000 |" in (tmp_path / "all" / "compare.md").read_text()


def test_merge_refuses_unequal_training_a_repeated_run_and_other_flags(tmp_path):
    from moekit.train.compare import merge

    a = _compare_dir(tmp_path, "a", {"x-s0": ("x", 0, 2.0, 1.0)})
    b = _compare_dir(tmp_path, "b", {"x-s1": ("x", 1, 2.2, 1.0)}, steps=300)
    with pytest.raises(UsageError, match=r"trained differently .*\['steps'\]"):
        merge([a, b], tmp_path / "out")
    with pytest.raises(UsageError, match="'x-s0' is in two of the directories"):
        merge([a, a], tmp_path / "out")
    with pytest.raises(UsageError, match="holds no compare.json"):
        merge([a, tmp_path], tmp_path / "out")
    assert not (tmp_path / "out" / "compare.json").exists()
    from moekit.cli import main

    assert main(["compare", "--merge", str(a), "--seeds", "3", "--out", str(tmp_path / "o2")]) == 2
    assert not (tmp_path / "o2").exists()
