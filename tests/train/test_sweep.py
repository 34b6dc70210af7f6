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
