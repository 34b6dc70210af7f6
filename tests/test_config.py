"""Config validation, JSON round-trip and parameter counts."""

import json

import pytest

import moekit


def test_round_trip_json(make_cfg):
    cfg = make_cfg(k=3, score="sigmoid", n_group=2, topk_group=1, num_shared_experts=2, shared_gate=True,
                   capacity_factor=1.25, eval_capacity_factor=2.0, num_experts=8)
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d["type"] == "MoEConfig" and d["version"] == 1
    assert moekit.MoEConfig.from_dict(d) == cfg
    r = cfg.router
    assert moekit.RouterConfig.from_dict(json.loads(json.dumps(r.to_dict()))) == r


def test_unknown_keys_warn_not_crash(make_cfg):
    d = make_cfg().to_dict()
    d["future_field"] = 1
    with pytest.warns(UserWarning, match="future_field"):
        assert moekit.MoEConfig.from_dict(d) == make_cfg()


def test_wrong_type_and_newer_version_are_refused(make_cfg):
    d = make_cfg().to_dict()
    with pytest.raises(ValueError, match="cannot be read as RouterConfig"):
        moekit.RouterConfig.from_dict(d)
    d["version"] = 99
    with pytest.raises(ValueError, match="version 99"):
        moekit.MoEConfig.from_dict(d)


@pytest.mark.parametrize("kw,match", [
    ({"k": 5}, r"RouterConfig.k=5 .*\[1, num_experts=4\]"),
    ({"k": 0}, r"RouterConfig.k=0"),
    ({"kind": "nope"}, r"RouterConfig.kind: unknown router 'nope'; registered: \['expert_choice', 'hash', 'null', .*'topk', 'topp'.*\]"),
    ({"capacity_factor": 0.0}, r"MoEConfig.capacity_factor=0.0 .*None \(dropless\) or a float > 0"),
    ({"capacity_factor": -1.0}, r"MoEConfig.capacity_factor"),
    ({"eval_capacity_factor": 0.0}, r"MoEConfig.eval_capacity_factor=0.0 .*None \(dropless in eval mode\) or a float > 0"),
    ({"score": "relu"}, r"RouterConfig.score='relu' .*one of \('softmax', 'sigmoid', 'sqrtsoftplus'\)"),
    ({"n_group": 3}, r"RouterConfig.n_group=3 .*divisor of num_experts=4"),
    ({"n_group": 2, "topk_group": 3}, r"RouterConfig.topk_group=3 .*\[1, n_group=2\]"),
    ({"n_group": 4, "topk_group": 1, "k": 2}, r"k <= topk_group \* num_experts / n_group = 1"),
    ({"activation": "tanh"}, r"MoEConfig.activation='tanh'"),
    ({"backend": "triton"}, r"MoEConfig.backend='triton' .*one of \('auto', 'grouped_mm'\)"),
    ({"d_model": 0}, r"MoEConfig.d_model=0"),
    ({"ec_capacity_factor": 0.0, "kind": "expert_choice"}, r"RouterConfig.ec_capacity_factor"),
])
def test_validation_names_field_and_allowed_values(make_cfg, kw, match):
    with pytest.raises(ValueError, match=match):
        moekit.MoELayer(make_cfg(**kw))


@pytest.mark.parametrize("kw", [
    {}, {"num_shared_experts": 2, "shared_gate": True}, {"activation": "gelu"}, {"num_experts": 8, "k": 3},
    {"num_shared_experts": 1, "d_shared": 40, "activation": "gelu"},
    {"kind": "null", "n_null": 3, "k": 3}, {"kind": "random", "k": 2},
])
def test_param_counts_without_building(make_cfg, kw):
    cfg = make_cfg(**kw)
    layer = moekit.MoELayer(cfg)
    assert cfg.num_params() == sum(p.numel() for p in layer.parameters())
    per_expert = layer.experts.down_proj[0].numel() * (3 if cfg.activation == "swiglu" else 2)
    shared = sum(p.numel() for n, p in layer.named_parameters() if n.startswith("shared"))
    router = sum(p.numel() for p in layer.router.parameters())
    expected_k = cfg.router.k * (4 / 7 if cfg.router.kind == "null" else 1)  # null: k*E/(E+M)
    assert cfg.num_active_params() == round(router + expected_k * per_expert + shared)


def test_fine_grained_segmentation_keeps_params(make_cfg):
    cfg = make_cfg(num_experts=4, k=2)
    fg = cfg.fine_grained(4)
    assert (fg.num_experts, fg.d_expert, fg.router.k) == (16, 16, 8)
    # expert parameters are unchanged; only the router grows
    assert fg.num_params() - fg.num_experts * 32 == cfg.num_params() - cfg.num_experts * 32
    assert fg.num_active_params() - 16 * 32 == cfg.num_active_params() - 4 * 32
    moekit.MoELayer(fg)
    with pytest.raises(ValueError, match="divisor of d_expert=64"):
        cfg.fine_grained(3)


def test_recurrent_and_global_fields_validate_and_round_trip():
    cfg = moekit.MoEConfig(d_model=16, num_experts=4, balance_scope="global",
                           router=moekit.RouterConfig(kind="recurrent", gru_dim=8, select_rule="topp", p=0.3))
    assert moekit.MoEConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg.validate()
    assert "gru_dim=8, select_rule=topp, p=0.3" in cfg.router.describe()
    with pytest.raises(ValueError, match="RouterConfig.select_rule='greedy'"):
        moekit.RouterConfig(kind="recurrent", select_rule="greedy").validate(4)


@pytest.mark.parametrize("kw,expected", [
    ({"kind": "topk", "k": 2}, True), ({"kind": "topk", "k": 1}, False),    # k = 1: the raw probability (Switch)
    ({"kind": "topk", "k": 1, "normalize": True}, True), ({"kind": "topk", "k": 2, "normalize": False}, False),
    ({"kind": "null", "k": 2}, True), ({"kind": "null", "k": 1}, False),
    ({"kind": "recurrent", "k": 1}, False), ({"kind": "recurrent", "select_rule": "topp", "k": 4}, False),
    ({"kind": "topp"}, False), ({"kind": "topp", "normalize": True}, True),
])
def test_normalize_default_resolves_per_rule(kw, expected):
    assert moekit.RouterConfig(**kw).normalizes() is expected


@pytest.mark.parametrize("cls,kw,match", [
    (moekit.RouterConfig, {"k": 2.5}, r"^RouterConfig.k=2.5 is invalid; allowed: an integer$"),
    (moekit.RouterConfig, {"kind": "topp", "p": "0.3"}, r"^RouterConfig.p='0.3' is invalid; allowed: a number$"),
    (moekit.RouterConfig, {"normalize": 1}, r"^RouterConfig.normalize=1 is invalid; allowed: true or false$"),
    (moekit.RouterConfig, {"routed_scaling_factor": float("inf")}, r"RouterConfig.routed_scaling_factor=inf .*finite"),
    (moekit.RouterConfig, {"jitter": float("nan")}, r"RouterConfig.jitter=nan .*finite"),
    (moekit.RouterConfig, {"k": None}, r"^RouterConfig.k=None is invalid; allowed: a value of type int$"),
])
def test_every_field_is_checked_against_its_annotation(cls, kw, match):
    from moekit.errors import UsageError

    with pytest.raises(UsageError, match=match):
        cls(**kw).validate(4)


def test_a_field_may_declare_non_finite_values_allowed():
    import dataclasses
    import math

    from moekit.config import check_fields
    from moekit.errors import UsageError

    @dataclasses.dataclass
    class Probe:
        limit: float = dataclasses.field(default=math.inf, metadata={"nonfinite": True})
        scale: float = 1.0

    check_fields(Probe())
    with pytest.raises(UsageError, match=r"^Probe.scale=inf is invalid; allowed: a finite number$"):
        check_fields(Probe(scale=math.inf))
