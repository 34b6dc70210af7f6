"""Hash routing (Hash Layers, arXiv 2106.04426; DeepSeek-V4's hash layers): experts from a fixed token id ->
experts table, weights from the gate, token ids handed to each MoE layer as its router state."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import moekit
from moekit.config import MoEConfig, RouterConfig
from moekit.errors import UsageError
from moekit.models import LMConfig, MoELM
from moekit.models.lm import KVCache
from moekit.routers.hash import random_table

V, E, D = 50, 6, 16


def _layer(**fields) -> moekit.MoELayer:
    torch.manual_seed(0)
    return moekit.MoELayer(MoEConfig(d_model=D, d_expert=8, num_experts=E,
                                     router=RouterConfig(kind="hash", vocab_size=V, **fields))).eval()


def test_experts_come_from_the_table_and_weights_from_the_gate():
    layer = _layer(k=2, score="sqrtsoftplus", routed_scaling_factor=1.5)
    x = torch.randn(2, 7, D)
    ids = torch.randint(0, V, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        layer(x, router_state=ids)
    idx_TK, w_TK = layer.routing_info().route.to_padded()
    table = layer.router.tid2eid
    assert torch.equal(idx_TK, table[ids.reshape(-1)])
    # DeepseekV4HashRouter.forward, transcribed.
    scores = F.softplus(F.linear(x.reshape(-1, D), layer.router.weight)).sqrt()
    weights = scores.gather(1, table[ids.reshape(-1)])
    weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20) * 1.5
    torch.testing.assert_close(w_TK, weights, rtol=1e-6, atol=1e-7)


def test_k1_normalised_is_the_papers_ungated_hash_layer():
    layer = _layer(k=1, normalize=True)
    with torch.no_grad():
        layer(torch.randn(9, D), router_state=torch.arange(9))
    assert torch.equal(layer.routing_info().route.weight_N, torch.ones(9))


def test_missing_ids_are_refused_by_name():
    with pytest.raises(UsageError, match=r"kind='hash'\) routes on token ids: pass the 4 tokens' ids"):
        _layer()(torch.randn(4, D))


def test_random_table_is_seeded_with_distinct_experts_per_id():
    table = random_table(200, E, 3, seed=5)
    assert table.shape == (200, 3) and table.dtype == torch.int64
    assert all(len(set(row)) == 3 for row in table.tolist())
    assert torch.equal(table, random_table(200, E, 3, seed=5)) and not torch.equal(table, random_table(200, E, 3, 6))
    assert len(table.unique()) == E  # every expert gets tokens


def test_moe_lm_hands_its_ids_to_every_moe_layer_and_decodes_with_the_cache():
    moe = MoEConfig(d_model=32, d_expert=16, num_experts=E, router=RouterConfig(kind="hash", k=2, vocab_size=64))
    torch.manual_seed(0)
    model = MoELM(LMConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, max_seq_len=32, init_std=0.2,
                           moe=moe)).eval()
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids)
    for layer in model.moe_layers():
        assert torch.equal(layer.routing_info().route.to_padded()[0], layer.router.tid2eid[ids.reshape(-1)])
    # The last token on top of a KV cache routes by its own id.
    cache = KVCache(model.cfg, batch=2, max_len=16)
    with torch.no_grad():
        model(ids[:, :-1], cache=cache)
        last = model(ids[:, -1:], cache=cache)
    torch.testing.assert_close(last[:, -1], full[:, -1], rtol=1e-5, atol=1e-5)


def test_disabled_experts_drop_their_picks_and_topp_reroutes_on_the_gate():
    layer = _layer(k=2)
    x, ids = torch.randn(20, D), torch.arange(20)
    with moekit.mask_experts(layer, disabled={0: [1]}), torch.no_grad():
        layer(x, router_state=ids)
    assert not bool((layer.routing_info().route.expert_idx_N == 1).any())
    table = layer.router.tid2eid
    with moekit.route(layer, kind="topp", p=0.5), torch.no_grad():
        layer(x, router_state=ids)  # top-p ignores the ids: it routes on the gate's softmax
        assert layer.router.kind == "topp"
    assert layer.router.kind == "hash" and layer.router.tid2eid is table


@pytest.mark.parametrize("bad, named", [(V, f"{V}"), (V + 7, f"{V + 7}"), (-1, "-1"), (-V, f"-{V}")])
def test_out_of_range_ids_are_refused_in_one_line(bad, named):
    # Without the check a negative id silently read the table from its end; a large one raised torch's IndexError.
    ids = torch.tensor([0, 3, bad, V - 1])
    with pytest.raises(UsageError, match=rf"^RouterConfig\(kind='hash'\): token id\(s\) {named} out of range; "
                                         rf"expected token ids in \[0, {V}\) \(the rows of its token id table\)$"):
        _layer()(torch.randn(4, D), router_state=ids)


def test_many_bad_ids_are_named_up_to_five():
    ids = torch.tensor([-3, V, V + 1, V + 2, V + 3, V + 4, 1, -3])
    with pytest.raises(UsageError, match=r"token id\(s\) -3, 50, 51, 52, 53, \.\.\. \(6 distinct\) out of range"):
        _layer(k=2)(torch.randn(8, D), router_state=ids)


@pytest.mark.parametrize("dtype", [torch.bool, torch.complex64])
def test_ids_that_are_not_integers_are_refused(dtype):
    # A boolean tensor would index the table as a mask.
    with pytest.raises(UsageError, match=r"routes on token ids: pass the 4 tokens' ids"):
        _layer()(torch.randn(4, D), router_state=torch.ones(4, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8])
def test_in_range_ids_route_exactly_by_the_table(dtype):
    layer = _layer(k=2)
    ids = torch.tensor([0, V - 1, 7, 0, V - 1, 23], dtype=dtype)
    x = torch.randn(6, D)
    with torch.no_grad():
        y = layer(x, router_state=ids)
        route = layer.routing_info().route
        y_again = layer(x, router_state=ids.long())
    assert torch.equal(route.to_padded()[0], layer.router.tid2eid[ids.long()])
    assert torch.equal(y, y_again) and torch.equal(route.weight_N, layer.routing_info().route.weight_N)


def test_moe_lm_refuses_ids_outside_its_vocabulary_and_a_smaller_hash_table():
    moe = MoEConfig(d_model=32, d_expert=16, num_experts=E, router=RouterConfig(kind="hash", k=2, vocab_size=64))
    model = MoELM(LMConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, max_seq_len=8, moe=moe)).eval()
    for bad in (64, -2):
        # Without the check: nn.Embedding's raw IndexError ("index out of range in self").
        with pytest.raises(UsageError, match=rf"^MoELM: token id\(s\) {bad} out of range; expected token ids in "
                                             r"\[0, 64\) \(LMConfig.vocab_size\)$"):
            model(torch.tensor([[1, bad, 2]]))
    with pytest.raises(UsageError, match=r"^MoELM: token ids must be integers, got a torch.float32 tensor"):
        model(torch.tensor([[1.0, 2.0]]))  # before: nn.Embedding's raw RuntimeError
    with pytest.raises(UsageError, match=r"RouterConfig.vocab_size=60 is invalid; allowed: at least the model's "
                                         r"vocabulary size 64"):
        LMConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2,
                 moe=MoEConfig(d_model=32, d_expert=16, num_experts=E,
                               router=RouterConfig(kind="hash", vocab_size=60))).validate()


def test_off_cpu_and_under_compile_the_check_is_a_device_side_assert(monkeypatch):
    """On CUDA a host-side check would synchronise every layer call: there (and under torch.compile) the check
    is torch._assert_async, which raises only at the next synchronisation (on CPU: at once)."""
    from moekit.utils.ids import check_token_ids

    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    monkeypatch.setattr(torch, "aminmax", None)  # the host-side path is not taken
    check_token_ids(torch.tensor([0, 9]), 10, "t")
    with pytest.raises(RuntimeError, match=r"^t: a token id is out of range; expected token ids in \[0, 10\)$"):
        check_token_ids(torch.tensor([0, 10]), 10, "t")
    with pytest.raises(RuntimeError, match="out of range"):
        check_token_ids(torch.tensor([-1, 3]), 10, "t")


@pytest.mark.parametrize("bad", [E, -1])
def test_a_table_holding_an_expert_id_outside_the_layer_is_refused_as_damaged(bad):
    # A checkpoint's table loaded in place (copy_ bumps the version the check is cached on); before the check
    # the gather raised "index 6 is out of bounds for dimension 1 with size 6".
    from moekit.errors import DataError

    layer = _layer(k=2)
    ids = torch.tensor([1, 2, 3])
    with torch.no_grad():
        layer(torch.randn(3, D), router_state=ids)  # checked and cached
        table = layer.router.tid2eid.clone()
        table[3, 1] = bad
        layer.router.tid2eid.copy_(table)
        with pytest.raises(DataError, match=rf"^RouterConfig\(kind='hash'\): expert id\(s\) {bad} out of range; "
                                            rf"expected expert ids in \[0, {E}\) \(the layer's experts\)$"):
            layer(torch.randn(3, D), router_state=ids)


@pytest.mark.parametrize("change,named", [({"k": 1}, "k=1"), ({"k": 3}, "k=3"), ({"seed": 5}, "seed=5"),
                                          ({"vocab_size": 80}, "vocab_size=80")])
def test_a_reroute_the_table_cannot_follow_is_refused_before_anything_changes(change, named):
    # Before: route(k=1) on a k=2 hash layer (DeepSeek-V4's hash layers, wrapped) was accepted and did nothing:
    # the layer kept the 2 experts per token of its (V, 2) table.
    layer = _layer(k=2)
    table = layer.router.tid2eid
    with pytest.raises(ValueError, match=rf"route\(\): RouterConfig\(kind='hash'\) {named}: .*table tid2eid "
                                         rf"\({V}, 2\).*; expected k=2, vocab_size={V}, seed=0 .*kind='topk'"):
        moekit.route(layer, **change)
    assert layer.router.cfg.k == 2 and layer.router.tid2eid is table


def test_a_reroute_of_the_weights_is_honoured():
    layer = _layer(k=2)
    x, ids = torch.randn(5, D), torch.arange(5)
    with torch.no_grad():
        layer(x, router_state=ids)
        before = layer.routing_info().route.weight_N
        with moekit.route(layer, normalize=False, routed_scaling_factor=2.0):
            layer(x, router_state=ids)
            after = layer.routing_info().route
    assert after.expert_idx_N.numel() == 10 and not torch.allclose(after.weight_N, before)
