"""`moekit.route` and `moekit.mask_experts` take effect when called (as torch.set_grad_enabled), so a
call without `with` is never a silent no-op; `with` and `.restore()` undo them."""

import pytest
import torch

import moekit


def _model():
    torch.manual_seed(0)
    cfg = moekit.MoEConfig(d_model=16, d_expert=8, num_experts=4, router=moekit.RouterConfig(k=2))
    return torch.nn.Sequential(moekit.MoELayer(cfg), moekit.MoELayer(cfg)).eval()


def test_route_without_with_changes_the_routing_until_restored():
    model, x = _model(), torch.randn(1, 6, 16)
    before = model(x)
    handle = moekit.route(model, k=1)
    assert all(layer.router.cfg.k == 1 for layer in moekit.moe_layers(model))
    assert not torch.allclose(model(x), before)
    handle.restore()
    handle.restore()  # idempotent
    assert all(layer.router.cfg.k == 2 for layer in moekit.moe_layers(model))
    torch.testing.assert_close(model(x), before)


def test_route_with_block_restores_even_after_an_exception():
    model = _model()
    with pytest.raises(RuntimeError, match="boom"), moekit.route(model, kind="topp", p=0.5) as layers:
        assert [layer.router.kind for layer in layers] == ["topp", "topp"]
        raise RuntimeError("boom")
    assert [layer.router.kind for layer in moekit.moe_layers(model)] == ["topk", "topk"]


def test_bad_route_changes_nothing():
    model = _model()
    with pytest.raises(ValueError, match="unknown RouterConfig fields"):
        moekit.route(model, nope=1)
    assert all(layer.router.cfg.k == 2 for layer in moekit.moe_layers(model))


def test_mask_experts_without_with_masks_until_restored():
    model = _model()
    handle = moekit.mask_experts(model, disabled={0: [1]})
    assert moekit.moe_layers(model)[0].router.expert_mask_E.tolist() == [0, -1, 0, 0]
    handle.restore()
    assert moekit.moe_layers(model)[0].router.expert_mask_E is None


def test_a_call_whose_handle_is_dropped_keeps_its_change():
    """`moekit.route(model, ...)` as a statement: its handle is garbage-collected at once, and Python closes the
    generator inside it (GeneratorExit at its `yield`); that must not undo the change ("from now on", as the README
    says). Only `restore()` or leaving `with` undoes."""
    import gc

    model = _model()
    moekit.route(model, kind="topp", p=0.5)
    moekit.mask_experts(model, disabled={1: [2]})
    gc.collect()
    assert [layer.router.kind for layer in moekit.moe_layers(model)] == ["topp", "topp"]
    assert moekit.moe_layers(model)[1].router.expert_mask_E.tolist() == [0, 0, -1, 0]
    handle = moekit.route(model, p=0.3)
    assert all(layer.router.cfg.p == 0.3 for layer in moekit.moe_layers(model))
    handle.restore()  # this one restores: back to the dropped call's top-p 0.5, not to the original top-k
    assert all(layer.router.cfg.kind == "topp" and layer.router.cfg.p == 0.5 for layer in moekit.moe_layers(model))


def test_a_route_failing_part_way_undoes_what_it_changed(monkeypatch):
    """Validation happens before any change; should applying fail anyway (here: rebuilding the second layer's
    router), the layers already changed go back before the error reaches the caller."""
    from moekit.layers import overrides

    model = _model()
    calls = []
    real = overrides._rebuild

    def failing_second(router, cfg):
        calls.append(router)
        if len(calls) == 2:
            raise RuntimeError("rebuild failed")
        return real(router, cfg)

    monkeypatch.setattr(overrides, "_rebuild", failing_second)
    with pytest.raises(RuntimeError, match="rebuild failed"):
        moekit.route(model, kind="topp", p=0.5)
    assert [layer.router.kind for layer in moekit.moe_layers(model)] == ["topk", "topk"]
    assert all(layer.cfg.router.kind == "topk" for layer in moekit.moe_layers(model))


def _state(model):
    return [(layer.router.cfg, layer.cfg.router, None if layer.router.expert_mask_E is None
             else layer.router.expert_mask_E.tolist()) for layer in moekit.moe_layers(model)]


def test_restoring_an_earlier_route_while_a_later_one_is_in_force_is_refused():
    """Handles restored out of order (the earlier first) used to leave the model re-routed after both restores:
    the earlier one put the original router back, then the later one put back what it had replaced, the earlier
    change (here k=1), silently. The earlier restore is refused, naming the order, and works once the later one
    has restored."""
    model = _model()
    before = _state(model)
    for second in (dict(kind="topp", p=0.5), dict(k=3)):
        first = moekit.route(model, k=1)
        later = moekit.route(model, **second)
        changed = _state(model)
        with pytest.raises(RuntimeError, match="restore the later change first"):
            first.restore()
        assert _state(model) == changed  # nothing undone
        later.restore()
        first.restore()
        assert _state(model) == before


def test_restoring_an_earlier_mask_while_a_later_one_is_in_force_is_refused():
    model = _model()
    first = moekit.mask_experts(model, disabled={0: [0]})
    later = moekit.mask_experts(model, disabled={0: [1]})
    with pytest.raises(RuntimeError, match="restore the later change first"):
        first.restore()  # used to leave expert 0 disabled after both restores
    assert moekit.moe_layers(model)[0].router.expert_mask_E.tolist() == [-1, -1, 0, 0]
    later.restore()
    first.restore()
    assert all(layer.router.expert_mask_E is None for layer in moekit.moe_layers(model))


def test_a_route_to_another_kind_and_a_mask_restored_out_of_order_are_refused():
    """route(kind=...) builds a new router that carries the mask in force; restoring out of order used to drop a
    mask still in force (the route's restore put back the unmasked router) or keep one already restored (the mask's
    restore cleared the replaced router's, not the one routing)."""
    model = _model()
    route = moekit.route(model, kind="topp", p=0.5)
    mask = moekit.mask_experts(model, disabled={0: [1]})
    with pytest.raises(RuntimeError, match="restore the later change first"):
        route.restore()
    assert moekit.moe_layers(model)[0].router.expert_mask_E.tolist() == [0, -1, 0, 0]
    mask.restore()
    route.restore()
    assert [layer.router.kind for layer in moekit.moe_layers(model)] == ["topk", "topk"]
    assert all(layer.router.expert_mask_E is None for layer in moekit.moe_layers(model))

    mask = moekit.mask_experts(model, disabled={0: [1]})
    route = moekit.route(model, kind="topp", p=0.5)
    with pytest.raises(RuntimeError, match="restore the later change first"):
        mask.restore()
    assert moekit.moe_layers(model)[0].router.expert_mask_E.tolist() == [0, -1, 0, 0]
    route.restore()
    mask.restore()
    assert [layer.router.kind for layer in moekit.moe_layers(model)] == ["topk", "topk"]
    assert all(layer.router.expert_mask_E is None for layer in moekit.moe_layers(model))


def test_a_later_same_kind_route_keeps_an_earlier_mask_restorable():
    """No conflict: a same-kind route keeps the router (and its mask); either order restores cleanly."""
    model = _model()
    mask = moekit.mask_experts(model, disabled={0: [1]})
    route = moekit.route(model, k=1)
    mask.restore()
    assert moekit.moe_layers(model)[0].router.expert_mask_E is None and moekit.moe_layers(model)[0].router.cfg.k == 1
    route.restore()
    assert all(layer.router.cfg.k == 2 for layer in moekit.moe_layers(model))
