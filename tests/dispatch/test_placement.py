"""Placements, their all-to-all cost, ExFlow-style affinity placement, speculative token shuffling, and
applying a placement (renumbering experts) without changing what the layer computes."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from moekit import MoEConfig, MoELayer, RouterConfig
from moekit.dispatch.placement import (
    Placement,
    _assign_min_cost,
    _balanced_ranks,
    affinity_placement,
    colocated_pairs,
    contiguous_homes,
    permute_experts_,
    speculative_homes,
    traffic,
)
from moekit.errors import UsageError
from moekit.experts.bank import ExpertBank

# ------------------------------------------------------------------------------------------ Placement


def test_placement_slots_and_orders():
    p = Placement.from_ranks([1, 0, 1, 0, 0, 1], 2)
    assert p.local_E == (0, 0, 1, 1, 2, 2)
    assert p.local_experts(0) == [1, 3, 4] and p.local_experts(1) == [0, 2, 5]
    assert p.slot_E().tolist() == [3, 0, 4, 1, 2, 5]
    assert p.order_E().tolist() == [1, 3, 4, 0, 2, 5]
    assert p.order_E()[p.slot_E()].tolist() == list(range(6))
    assert not p.is_contiguous() and Placement.contiguous(6, 2).is_contiguous()
    assert Placement.contiguous(6, 3).local_experts(2) == [4, 5]


@pytest.mark.parametrize("rank_E, local_E, match", [
    ((0, 0, 0, 1), (0, 1, 2, 0), "rank 0 holds local indices"),
    ((0, 1, 0, 1), (0, 0, 0, 1), "rank 0 holds local indices"),
    ((0, 1, 2), (0, 0, 0), "cannot be sharded over 2 ranks"),
])
def test_placement_refuses_unbalanced_or_inconsistent_maps(rank_E, local_E, match):
    with pytest.raises(UsageError, match=match):
        Placement(rank_E, local_E, 2)
    with pytest.raises(UsageError, match="ranks must lie in 0..1"):
        Placement.from_ranks([0, 2, 1, 0], 2)


# ------------------------------------------------------------------------------------------ traffic


def test_traffic_counts_one_row_per_remote_rank_and_nothing_for_local_tokens():
    # 4 experts, contiguous on 2 ranks (0,1 | 2,3); tokens 0,1 live on rank 0, tokens 2,3 on rank 1
    experts_1TK = np.array([[[0, 1, -1],    # all local: nothing moves
                             [0, 2, 3],     # one row to rank 1 (carrying two assignments)
                             [-1, -1, -1],  # no expert (null): nothing moves
                             [0, 1, 2]]])   # one row to rank 0 (two assignments)
    t = traffic(experts_1TK, [0, 0, 1, 1], 2, np.array([0, 0, 1, 1]))
    assert t.dispatch_rows_L.tolist() == [2] and t.combine_rows_L.tolist() == [2]
    assert t.remote_assignments_L.tolist() == [4]
    assert t.rows == 4
    assert t.bytes_per_token(d_model=10, itemsize=2) == (4 * 10 * 2 + 4 * 12) / 4
    assert contiguous_homes(4, 2).tolist() == [0, 0, 1, 1]
    assert traffic(experts_1TK, [0, 0, 1, 1], 2).rows == 4  # the default homes are the contiguous ones


def test_traffic_with_a_home_per_layer_charges_the_move():
    # one token, two layers, experts: layer 0 on rank 1, layer 1 on rank 0; 2 ranks, one expert each
    experts_LTK = np.array([[[1]], [[0]]])
    stay = traffic(experts_LTK, [0, 1], 2, np.array([0]))
    assert stay.dispatch_rows_L.tolist() == [1, 0] and stay.combine_rows_L.tolist() == [1, 0]
    # ExFlow's context coherence: the token stays where its expert ran (home of layer 1 = rank 1); the
    # last layer's output goes back to its own home
    coherent = traffic(experts_LTK, [0, 1], 2, np.array([[0], [1]]))
    assert coherent.dispatch_rows_L.tolist() == [1, 1] and coherent.combine_rows_L.tolist() == [0, 1]
    # ... a home that holds neither the row nor an expert costs the row's move
    elsewhere = traffic(np.array([[[1]], [[1]]]), [0, 1], 2, np.array([[0], [0]]))
    assert elsewhere.combine_rows_L.tolist() == [1, 1]
    moved = traffic(np.array([[[0]], [[1]]]), [0, 1], 2, np.array([[1], [0]]))
    # layer 0: expert on rank 0, home 1 -> 1 row out; output to next home 0 = the expert's rank: 0 back
    assert moved.dispatch_rows_L.tolist() == [1, 1] and moved.combine_rows_L.tolist() == [0, 1]


def test_traffic_names_bad_input():
    with pytest.raises(ValueError, match="experts_LTK must be an integer array"):
        traffic(np.zeros((2, 3)), [0, 1], 2)
    with pytest.raises(ValueError, match="has no rank"):
        traffic(np.array([[[5]]]), [0, 1], 2)
    with pytest.raises(ValueError, match="home_LT"):
        traffic(np.array([[[0]]]), [0, 1], 2, np.array([3]))


# ------------------------------------------------------------------------------------------ assignment


def test_hungarian_is_exact_against_brute_force():
    rng = np.random.default_rng(0)
    for n in (1, 2, 3, 5, 6):
        for _ in range(5):
            cost = rng.integers(0, 9, size=(n, n)).astype(float)
            col = _assign_min_cost(cost)
            assert sorted(col.tolist()) == list(range(n))
            best = min(sum(cost[i, p[i]] for i in range(n)) for p in itertools.permutations(range(n)))
            assert cost[np.arange(n), col].sum() == best


def test_balanced_ranks_is_exact_against_brute_force():
    rng = np.random.default_rng(1)
    E, W = 6, 3
    for _ in range(5):
        score = rng.integers(0, 9, size=(E, W)).astype(float)
        ranks = _balanced_ranks(score)
        assert np.bincount(ranks, minlength=W).tolist() == [2, 2, 2]
        best = max(sum(score[e, r] for e, r in enumerate(assign))
                   for assign in itertools.product(range(W), repeat=E) if np.bincount(assign, minlength=W).tolist() == [2] * W)
        assert score[np.arange(E), ranks].sum() == best


# ------------------------------------------------------------------------------------------ affinity


def _chain_trace(T: int, E: int, L: int, k: int, seed: int, noise: float = 0.0) -> np.ndarray:
    """Token paths follow fixed per-layer permutations: the experts a token uses at l + 1 are pi_l of
    those at l, so a placement exists where every consecutive pair shares a rank."""
    rng = np.random.default_rng(seed)
    perms = [rng.permutation(E) for _ in range(L - 1)]
    experts_LTK = np.empty((L, T, k), dtype=np.int64)
    experts_LTK[0] = np.stack([rng.choice(E, k, replace=False) for _ in range(T)])
    for layer in range(1, L):
        experts_LTK[layer] = perms[layer - 1][experts_LTK[layer - 1]]
        for t in np.nonzero(rng.random(T) < noise)[0]:  # some tokens leave their path
            experts_LTK[layer, t] = rng.choice(E, k, replace=False)
    return experts_LTK


@pytest.mark.parametrize("E, W", [(8, 2), (8, 4), (16, 4)])
def test_affinity_placement_finds_the_perfect_placement_of_chains(E, W):
    experts_LTK = _chain_trace(T=400, E=E, L=4, k=1, seed=E + W)
    rank_LE = affinity_placement(experts_LTK, E, W)
    assert all(np.bincount(r, minlength=W).tolist() == [E // W] * W for r in rank_LE)  # balanced per layer
    assert colocated_pairs(experts_LTK, rank_LE, E) == 1.0
    contiguous_LE = np.tile(np.arange(E) // (E // W), (4, 1))
    assert colocated_pairs(experts_LTK, contiguous_LE, E) < 0.7
    # top-1, ExFlow's context coherence (the token stays where its expert ran): no hop crosses ranks
    home_LT = np.empty((4, 400), dtype=np.int64)
    home_LT[0] = rank_LE[0][experts_LTK[0, :, 0]]
    home_LT[1:] = np.stack([rank_LE[layer][experts_LTK[layer, :, 0]] for layer in range(3)])
    assert traffic(experts_LTK, rank_LE, W, home_LT).rows == 0
    assert traffic(experts_LTK, contiguous_LE, W, home_LT).rows > 0


def test_affinity_placement_on_top2_noisy_chains_beats_contiguous():
    E, W = 8, 2
    experts_LTK = _chain_trace(T=600, E=E, L=3, k=2, seed=3, noise=0.2)
    rank_LE = affinity_placement(experts_LTK, E, W)
    contiguous_LE = np.tile(np.arange(E) // (E // W), (3, 1))
    assert colocated_pairs(experts_LTK, rank_LE, E) > colocated_pairs(experts_LTK, contiguous_LE, E) + 0.1
    with pytest.raises(UsageError, match="cannot be sharded over 3 ranks"):
        affinity_placement(experts_LTK, E, 3)


# ------------------------------------------------------------------------------------------ speculative


def test_speculative_homes_is_exact_for_two_ranks():
    rng = np.random.default_rng(2)
    rank_E = np.array([0, 0, 0, 1, 1, 1])
    for _ in range(10):
        experts_TK = np.stack([rng.choice(6, 3, replace=False) for _ in range(8)])
        experts_TK[rng.random((8, 3)) < 0.3] = -1
        home_T = speculative_homes(experts_TK, rank_E, 2)
        assert np.bincount(home_T, minlength=2).tolist() == [4, 4]

        def cost(home_T, experts_TK=experts_TK):  # rows first, then assignments away from home
            t = traffic(experts_TK[None], rank_E, 2, home_T)
            return int(t.dispatch_rows_L[0]), int(t.remote_assignments_L[0])

        best = min(cost(np.isin(np.arange(8), side).astype(np.int64)) for side in itertools.combinations(range(8), 4))
        assert cost(home_T) == best


def test_speculative_homes_moves_tokens_to_their_experts():
    # each token's experts all live on one rank, tokens balanced over ranks but listed in the wrong place
    rank_E = np.arange(8) // 2  # 4 ranks, experts (0,1) (2,3) (4,5) (6,7)
    rng = np.random.default_rng(4)
    owner_T = rng.permutation(np.repeat(np.arange(4), 5))
    experts_TK = np.stack([2 * owner_T, 2 * owner_T + 1], axis=1)
    experts_TK[::3, 1] = -1
    before = traffic(experts_TK[None], rank_E, 4)  # contiguous homes
    home_T = speculative_homes(experts_TK, rank_E, 4)
    assert before.rows > 0 and traffic(experts_TK[None], rank_E, 4, home_T).rows == 0
    assert np.bincount(home_T, minlength=4).tolist() == [5] * 4
    # a tight capacity forces some tokens away from their experts; each rank holds at most `capacity`
    crowded = np.tile(np.array([[0, 1]]), (6, 1))  # every token wants rank 0
    home = speculative_homes(crowded, rank_E, 4, capacity=2)
    assert np.bincount(home, minlength=4).max() == 2
    with pytest.raises(UsageError, match="capacity=1 tokens per rank cannot hold 6 tokens"):
        speculative_homes(crowded, rank_E, 4, capacity=1)


# ------------------------------------------------------------------------------------------ applying


ROUTERS = [
    {"kind": "topk", "k": 2, "bias_update_rate": 0.01},
    {"kind": "topk", "k": 2, "score": "sigmoid", "n_group": 2, "topk_group": 1},
    {"kind": "topp", "p": 0.5},
    {"kind": "null", "k": 3, "n_null": 8},
    {"kind": "random", "k": 2},
    {"kind": "expert_choice"},
]


@pytest.mark.parametrize("router", ROUTERS, ids=[r["kind"] + ("_grouped" if r.get("n_group") else "") for r in ROUTERS])
def test_applying_a_placement_leaves_outputs_unchanged(make_cfg, router):
    layer = MoELayer(make_cfg(num_experts=8, **router)).double()
    if router["kind"] == "topk":
        torch.nn.init.normal_(layer.router.e_score_correction_bias, std=0.1)
        layer.router.expert_mask_E = torch.tensor([0, 0, -1, 0, 0, 0, 0, 0], dtype=torch.int8)
    if router["kind"] == "null":
        # null rows start as exact copies of the real rows: every real expert ties with its copy and
        # top-k breaks ties by position, which renumbering changes. Training separates them; so do we.
        torch.nn.init.normal_(layer.router.null_weight, std=32 ** -0.5)
    x = torch.randn(2, 12, 32, dtype=torch.float64)
    y = layer(x)
    before = layer.routing_info().executed
    if router.get("n_group"):
        placement = Placement.from_ranks([1, 1, 1, 1, 0, 0, 0, 0], 2)  # swaps the two groups of 4
    else:
        placement = Placement.from_ranks([1, 0, 1, 0, 0, 1, 1, 0], 2)
    order_E = placement.order_E()
    permute_experts_(order_E, layer.experts, layer.router)
    # gate math is fp32 whatever the model dtype: a softmax over permuted logits rounds differently
    torch.testing.assert_close(layer(x), y, atol=1e-6, rtol=1e-6)
    after = layer.routing_info().executed
    # same (token, expert) pairs under the new numbering: old id = order_E[new id]
    pairs = sorted(zip(before.token_idx_N.tolist(), before.expert_idx_N.tolist(), strict=True))
    mapped = sorted(zip(after.token_idx_N.tolist(), order_E[after.expert_idx_N.numpy()].tolist(), strict=True))
    assert pairs == mapped and len(pairs) > 0
    # the permuted layer's shard of rank r is rows r*E/W .. of its bank: the contiguous placement
    assert order_E[:4].tolist() == placement.local_experts(0)


def test_applying_a_placement_refuses_what_it_cannot_keep(make_cfg, monkeypatch):
    layer = MoELayer(make_cfg(num_experts=8, k=2, score="sigmoid", n_group=2, topk_group=1))
    with pytest.raises(ValueError, match="moves whole groups"):
        permute_experts_(Placement.from_ranks([1, 0, 1, 0, 0, 1, 1, 0], 2).order_E(), layer.experts, layer.router)
    with pytest.raises(ValueError, match="permutation of 0..7"):
        permute_experts_([0, 1, 2, 3, 4, 5, 6, 6], layer.experts, layer.router)
    # A per-expert tensor the router declares (Router.expert_tensors) must have one row per expert.
    layer.router.register_buffer("mystery_E", torch.zeros(3))
    monkeypatch.setattr(type(layer.router), "expert_tensors", (*type(layer.router).expert_tensors, "mystery_E"))
    with pytest.raises(ValueError, match=r"'mystery_E' has shape \(3,\); expected 8 rows"):
        permute_experts_(np.arange(8), layer.experts, layer.router)


def test_placement_report_prices_each_scheme_with_traffic():
    from moekit.dispatch.placement import following_homes, placement_report

    rng = np.random.default_rng(3)
    E, W, T = 8, 2, 64
    experts_LTK = np.empty((3, T, 2), dtype=np.int64)
    experts_LTK[0] = np.stack([rng.permutation(E)[:2] for _ in range(T)])
    chain = rng.permutation(E)
    for layer in (1, 2):
        experts_LTK[layer] = chain[experts_LTK[layer - 1]]  # each layer's experts follow from the previous
    report = placement_report(experts_LTK, E, W, d_model=16, itemsize=2)
    contiguous_LE = np.broadcast_to(np.arange(E) // (E // W), (3, E))
    assert report["bytes_per_token"]["current"] == traffic(experts_LTK, contiguous_LE, W).bytes_per_token(16, 2)
    affinity_LE = np.asarray(report["affinity_rank_LE"])
    assert report["bytes_per_token"]["affinity"] == traffic(
        experts_LTK, affinity_LE, W, following_homes(experts_LTK, affinity_LE, W)).bytes_per_token(16, 2)
    assert report["colocated_pairs"]["affinity"] > report["colocated_pairs"]["current"]
    assert report["saved_fraction"]["affinity"] > 0 and report["saved_fraction"]["current"] == 0
    # homes follow the first expert of the previous layer
    homes_LT = following_homes(experts_LTK, affinity_LE, W)
    assert (homes_LT[1] == affinity_LE[0][experts_LTK[0, :, 0]]).all()


def test_permuting_experts_reaches_biases_and_every_layout():
    """gpt-oss-style banks (transposed, interleaved, per-expert biases) and DBRX's flat stacks are
    renumbered whole: the layer's outputs stay the same."""
    from moekit.experts.bank import ExpertLayout

    torch.manual_seed(0)
    for layout, act in ((ExpertLayout(in_transposed=True, out_transposed=True, interleaved=True, bias=True), "swiglu"),
                        (ExpertLayout(split=True, flat=True), "swiglu")):
        cfg = MoEConfig(d_model=16, d_expert=8, num_experts=4, router=RouterConfig(k=2))
        layer = MoELayer(cfg).eval()
        layer.experts = ExpertBank(4, 16, 8, act, layout)
        for w in layer.experts.parameters():
            torch.nn.init.normal_(w)
        x = torch.randn(2, 5, 16)
        before = layer(x)
        permute_experts_([2, 0, 3, 1], layer.experts, layer.router)
        torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5)
