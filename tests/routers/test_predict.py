"""The one next-layer prediction rule (moekit.routers.predict): on the layer's own input it equals
the router's choice for every router that can predict, it changes no state and carries no
gradient, null experts never appear, and the recurrent router is refused."""

import pytest
import torch

import moekit
from moekit.routers import RecurrentState, router_class
from moekit.routers.predict import can_predict, predict_experts, predict_route, priority_order

E, D = 8, 16

CONFIGS = {
    "topk": dict(kind="topk", k=2),
    "topk_sigmoid_bias_groups": dict(kind="topk", k=3, score="sigmoid", n_group=4, topk_group=2,
                                     bias_update_rate=1e-3),
    "topp": dict(kind="topp", p=0.5),
    "null": dict(kind="null", n_null=4, k=3),
    "random": dict(kind="random", k=3),
    "expert_choice": dict(kind="expert_choice"),
}


def make(name: str):
    torch.manual_seed(0)
    cfg = moekit.RouterConfig(**CONFIGS[name]).validate(E)
    router = router_class(cfg.kind)(cfg, D, E)
    if name == "topk_sigmoid_bias_groups":
        router.e_score_correction_bias.copy_(torch.linspace(-0.3, 0.3, E))  # a bias that changes choices
    return router


def assignment_set(route) -> set[tuple[int, int]]:
    return set(zip(route.token_idx_N.tolist(), route.expert_idx_N.tolist(), strict=True))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_prediction_on_the_same_input_is_the_routers_choice(name):
    router = make(name).eval()
    x = torch.randn(11, D, requires_grad=True)
    state = {k: v.clone() for k, v in router.state_dict().items()}
    pred = predict_route(router, x)
    choice = router(x)
    assert assignment_set(pred) == assignment_set(choice)
    assert not pred.weight_N.requires_grad  # no gradient: a prediction never trains anything
    assert all(torch.equal(v, router.state_dict()[k]) for k, v in state.items())  # no state update
    ids_TK = predict_experts(router, x)
    assert int(ids_TK.max()) < E  # null experts (ids >= E) never appear
    for t in range(11):
        picked = [e for e in ids_TK[t].tolist() if e >= 0]
        assert set(picked) == {e for tok, e in assignment_set(choice) if tok == t}
        scores = choice.scores_TE[t, picked]
        assert torch.all(scores[:-1] >= scores[1:])  # best first


def test_null_picks_are_left_out_and_all_null_tokens_predict_nothing():
    router = make("null").eval()
    with torch.no_grad():
        router.null_weight.mul_(0).add_(router.weight[:1] * 50)  # every null row beats every real row
    x = router.weight[:1].detach().repeat(3, 1)
    assert predict_experts(router, x).shape == (3, 0)  # k = 3 picks, all null: nothing to load


def test_expert_masks_are_honoured():
    router = make("topk").eval()
    router.expert_mask_E = torch.tensor([-1, -1, -1, 0, 0, 0, 0, 1], dtype=torch.int8)
    ids = predict_experts(router, torch.randn(20, D))
    assert not bool(((ids >= 0) & (ids < 3)).any()) and bool((ids == 7).any(dim=1).all())


def test_recurrent_router_is_refused():
    cfg = moekit.RouterConfig(kind="recurrent", k=2, gru_dim=8).validate(E)
    router = router_class("recurrent")(cfg, D, E)
    assert not can_predict(router) and can_predict(make("topk"))
    with pytest.raises(ValueError, match="cannot predict experts from a hidden state"):
        predict_route(router, torch.randn(2, D))
    assert router(torch.randn(2, D), state=RecurrentState(torch.nn.GRUCell(8, 8))).num_assignments == 4


def test_priority_order_is_rank_major():
    pred = torch.tensor([[3, 1, -1], [3, 2, 5], [0, -1, -1]])
    assert priority_order(pred) == [3, 0, 1, 2, 5]
    assert priority_order(torch.zeros((2, 0), dtype=torch.long)) == []
