"""Each router owns its config (registered with it); RouterConfig dispatches on `kind`, reads the
version-1 union JSON, converts between kinds, and answers the capability questions callers ask.
Tests parametrized over `registered_routers()` run every router, a new one included."""

import copy
import dataclasses
import json
import pickle
import warnings

import pytest
import torch

import moekit
from moekit.config import V1_ROUTER_FIELDS, router_config_class, router_fields
from moekit.errors import UsageError
from moekit.routers import register, router_class
from moekit.routers.registry import router_aux_loss_names

KINDS = moekit.registered_routers()


@pytest.mark.parametrize("kind", KINDS)
def test_the_factory_returns_the_registered_config_and_it_round_trips(kind):
    cfg = moekit.RouterConfig(kind=kind)
    assert type(cfg) is router_config_class(kind) is router_class(kind).config_class
    assert isinstance(cfg, moekit.RouterConfig) and cfg.kind == kind
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d["type"] == "RouterConfig" and d["version"] == 2 and d["kind"] == kind
    assert set(d) == {"type", "version"} | {f.name for f in dataclasses.fields(cfg)}  # its own fields only
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert moekit.RouterConfig.from_dict(d) == cfg
    assert copy.deepcopy(cfg) == cfg and pickle.loads(pickle.dumps(cfg)) == cfg
    assert cfg.describe() and isinstance(cfg.describe(), str)


@pytest.mark.parametrize("kind", KINDS)
def test_capabilities_of_every_router_agree_with_the_built_layer(kind):
    cfg = moekit.MoEConfig(d_model=32, d_expert=16, num_experts=8, router=moekit.RouterConfig(kind=kind))
    layer = moekit.MoELayer(cfg)
    router = cfg.router
    assert cfg.num_params() == sum(p.numel() for p in layer.parameters())
    shared = router.build_shared_module()
    assert router.shared_module_params() == (0 if shared is None else sum(p.numel() for p in shared.parameters()))
    assert router.carries_state() == (router.initial_state(shared) is not None)
    assert 0 < router.expected_experts_per_token(8) <= 8
    assert 1 <= router.min_resident_experts(8) <= 8
    assert set(router.aux_loss_names()) <= set(router.router_losses) <= set(router_aux_loss_names())
    layer.train()
    x = torch.randn(2, 5, 32)
    # A hash router routes on the token ids, which the model hands it as the state (moekit.routers.hash).
    ids = torch.randint(0, 100, (2, 5)) if router.routes_on_token_ids() else None
    layer(x, router_state=router.initial_state(shared) if ids is None else ids)
    assert set(layer.routing_info().aux) == set(moekit.layers.moe.aux_loss_names(cfg))


def test_fields_of_other_routers_are_refused_at_construction():
    with pytest.raises(UsageError, match=r"RouterConfig\(kind='topp'\): k does not apply to this router; its fields: "):
        moekit.RouterConfig(kind="topp", k=2)
    with pytest.raises(UsageError, match=r"unknown router 'nope'"):
        moekit.RouterConfig(kind="nope")
    cfg = moekit.RouterConfig(kind="topp", p=0.3)
    with pytest.raises(UsageError, match=r"kind='topk' does not match TopPConfig .*convert"):
        dataclasses.replace(cfg, kind="topk")  # a config never changes kind in place
    with pytest.raises(UsageError, match=r"kind='topk' does not match TopPConfig .*RouterConfig\(kind=\.\.\."):
        cfg.kind = "topk"  # nor by assignment, which would keep top-p's fields under top-k's name
    assert cfg.kind == "topp"


def test_version_1_union_json_loads_silently_and_unknown_keys_warn():
    union = {"type": "RouterConfig", "version": 1, "kind": "topp", "k": 2, "score": "softmax", "normalize": None,
             "routed_scaling_factor": 1.0, "n_group": 1, "topk_group": 1, "bias_update_rate": 0.0,
             "bias_recenter": False, "jitter": 0.0, "ec_capacity_factor": 2.0, "allow_causal_leak": False,
             "p": 0.3, "min_k": 1, "max_k": 4, "n_null": 0, "k_schedule": "linear", "k_schedule_steps": 1000,
             "gru_dim": 256, "select_rule": "topk"}
    assert set(union) - {"type", "version"} == V1_ROUTER_FIELDS
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = moekit.RouterConfig.from_dict(union)
    assert cfg == moekit.RouterConfig(kind="topp", p=0.3, max_k=4)
    with pytest.warns(UserWarning, match=r"ignoring unknown keys \['future'\]"):
        moekit.RouterConfig.from_dict({**union, "future": 1})
    new = cfg.to_dict()
    with pytest.warns(UserWarning, match=r"ignoring unknown keys \['k'\]"):  # version 2: another router's field
        moekit.RouterConfig.from_dict({**new, "k": 2})
    with pytest.raises(ValueError, match="version 3 is newer"):
        moekit.RouterConfig.from_dict({**new, "version": 3})


def test_convert_keeps_the_fields_both_kinds_have():
    topk = moekit.RouterConfig(kind="topk", k=3, normalize=True, jitter=0.1, score="sigmoid")
    topp = topk.convert("topp", p=0.5)
    # score carries over: top-p over a sigmoid rule's normalised affinities (docs/routing.md)
    assert topp == moekit.RouterConfig(kind="topp", p=0.5, normalize=True, jitter=0.1, score="sigmoid")
    assert topp.convert("topk") == moekit.RouterConfig(kind="topk", normalize=True, jitter=0.1,
                                                       score="sigmoid")  # k: the default
    with pytest.raises(UsageError, match="n_null does not apply"):
        topk.convert("topp", n_null=2)


def test_route_overrides_convert_between_kinds(make_cfg):
    layer = moekit.MoELayer(make_cfg(k=2, jitter=0.05))
    with moekit.route(layer, kind="topp", p=0.6) as (changed,):
        assert changed.router.cfg == moekit.RouterConfig(kind="topp", p=0.6, jitter=0.05)
        assert changed.router.weight is layer.router.weight  # the same gate, nothing copied
    assert layer.router.cfg == moekit.RouterConfig(k=2, jitter=0.05)
    with pytest.raises(ValueError, match="route\\(\\): RouterConfig\\(kind='topp'\\): k does not apply"):
        with moekit.route(layer, kind="topp", k=3):
            pass
    with pytest.raises(ValueError, match=r"route\(\): RouterConfig\(kind='topk'\): p does not apply"):
        with moekit.route(layer, p=0.3):
            pass


def test_register_pairs_a_router_with_its_config():
    with pytest.raises(TypeError, match="config="):
        register("probe")(router_class("topk"))
    with pytest.raises(ValueError, match="declare `kind: str = 'probe'`"):
        register("probe", config=router_config_class("topk"))(router_class("topk"))
    assert "probe" not in moekit.registered_routers()
    assert {"kind", "jitter", "k", "p", "n_null", "gru_dim"} <= set(router_fields())


def test_reference_backend_of_old_configs_maps_to_auto_with_a_warning(make_cfg):
    with pytest.warns(UserWarning, match="backend='reference' is no longer a layer backend"):
        cfg = moekit.MoEConfig.from_dict({**make_cfg().to_dict(), "backend": "reference"})
    assert cfg.backend == "auto"


def test_router_output_is_immutable_and_routing_info_says_chosen_and_executed(make_cfg):
    layer = moekit.MoELayer(make_cfg(k=1, num_experts=4, capacity_factor=0.5))
    layer(torch.randn(16, 32))
    info = layer.routing_info()
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.route.weight_N = torch.zeros(1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.route.extras.state = 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.num_dropped = 0
    assert info.num_dropped > 0  # capacity 0.5 drops in training
    assert info.route.num_assignments == 16 and info.executed.num_assignments == 16 - info.num_dropped
    assert torch.equal(info.executed.counts_E(), info.counts_E)
    assert info.router_state is None


def test_router_output_aux_is_read_only_and_still_copies_and_pickles(make_cfg):
    """A frozen dataclass whose aux is a plain dict is not immutable: `route.aux["x"] = ...` would change
    the losses every holder of the output sees."""
    cfg = make_cfg(k=2, num_experts=4)
    router = router_class(cfg.router.kind)(cfg.router, 32, 4)
    route = router(torch.randn(6, 32))
    route = dataclasses.replace(route, aux={"z": torch.tensor(1.0)})
    with pytest.raises(TypeError):
        route.aux["x"] = torch.tensor(2.0)
    assert dict(route.aux) == {"z": torch.tensor(1.0)} and list(route.keep(route.weight_N > 0).aux) == ["z"]
    layer = moekit.MoELayer(cfg)
    layer(torch.randn(2, 3, 32))
    info = layer.routing_info()
    with pytest.raises(TypeError):
        info.aux["x"] = torch.tensor(2.0)
    assert set(info.aux) >= {"load_balance", "z_loss"}
    detached = dataclasses.replace(info, aux={k: v.detach() for k, v in info.aux.items()})
    for copied in (copy.deepcopy(detached), pickle.loads(pickle.dumps(detached))):
        assert set(copied.aux) == set(info.aux)
        with pytest.raises(TypeError):
            copied.aux["x"] = torch.tensor(2.0)


@pytest.mark.parametrize("kind", KINDS)
def test_every_tensor_with_one_row_per_expert_is_declared_in_expert_tensors(kind):
    """Pruning and expert renumbering (compress.prune, dispatch.placement.permute_experts_) touch exactly
    the tensors a router declares; an undeclared per-expert tensor would silently keep the old experts."""
    E, D = 7, 12  # sizes no other router dimension takes
    router = router_class(kind)(moekit.RouterConfig(kind=kind), D, E)
    tensors = dict(router.named_parameters(recurse=False)) | dict(router.named_buffers(recurse=False))
    per_expert = {name for name, t in tensors.items() if t.dim() >= 1 and t.shape[0] == E}
    assert per_expert == set(router_class(kind).expert_tensors) & set(tensors), kind


@pytest.mark.parametrize("kind", KINDS)
def test_fine_grained_keeps_the_active_expert_width_of_every_router(kind):
    """DeepSeekMoE segmentation (arXiv 2401.06066): m times more experts, m times narrower, so a token's
    expert count (k, min_k/max_k, null experts, an expert-choice capacity) scales by m — for every router."""
    cfg = moekit.MoEConfig(d_model=32, d_expert=16, num_experts=8, router=moekit.RouterConfig(kind=kind))
    fine = cfg.fine_grained(4)
    assert (fine.num_experts, fine.d_expert) == (32, 4)
    assert fine.router.expected_experts_per_token(32) == pytest.approx(4 * cfg.router.expected_experts_per_token(8))
    assert fine.router.min_resident_experts(32) >= cfg.router.min_resident_experts(8)
    for name in type(cfg.router).expert_count_fields:
        before = getattr(cfg.router, name)
        assert getattr(fine.router, name) == (None if before is None else before * 4), name
    fine.validate()
