"""The MoE language model: counts, causality, KV cache, recurrent state, generation."""

import dataclasses

import pytest
import torch

import moekit
from moekit.models import KVCache, LMConfig, MoELM
from moekit.models.generate import generate, sample_next

ROUTER_KW = {"topk": {"k": 2}, "topp": {}, "null": {"k": 2, "n_null": 4}, "recurrent": {"k": 2, "gru_dim": 16},
             "random": {"k": 2}, "expert_choice": {"allow_causal_leak": True}}


def lm_cfg(kind="topk", **kw):
    router = moekit.RouterConfig(kind=kind, **ROUTER_KW[kind])
    moe = moekit.MoEConfig(d_expert=32, num_experts=4, router=router)
    return LMConfig(**{"vocab_size": 50, "d_model": 32, "n_layers": 3, "n_heads": 4, "max_seq_len": 64,
                       "moe": moe, **kw})


KINDS = ["topk", "topp", "null", "recurrent", "random"]


@pytest.mark.parametrize("kw", [{}, {"n_dense": 1}, {"tie_embeddings": False}, {"qk_norm": True, "n_kv_heads": 2}])
@pytest.mark.parametrize("kind", ["topk", "recurrent", "null"])
def test_parameter_counts_match_the_built_model(kind, kw):
    cfg = lm_cfg(kind, **kw)
    model = MoELM(cfg)
    assert cfg.num_params() == sum(p.numel() for p in model.parameters())
    assert cfg.num_active_params() < cfg.num_params()


@pytest.mark.parametrize("kind", KINDS)
def test_causal_future_tokens_do_not_change_past_logits(kind):
    model = MoELM(lm_cfg(kind)).double().eval()
    ids = torch.randint(0, 50, (2, 12))
    changed = ids.clone()
    changed[:, 8:] = (changed[:, 8:] + 7) % 50
    torch.testing.assert_close(model(ids)[:, :8], model(changed)[:, :8])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("kw", [{}, {"qk_norm": True, "n_kv_heads": 2, "n_dense": 1}])
def test_kv_cache_prefill_and_steps_equal_full_forward(kind, kw):
    model = MoELM(lm_cfg(kind, **kw)).double().eval()
    ids = torch.randint(0, 50, (2, 10))
    full = model(ids)
    cache = KVCache(model.cfg, 2, 16, dtype=torch.float64)
    parts = [model(ids[:, :6], cache=cache)] + [model(ids[:, t:t + 1], cache=cache) for t in range(6, 10)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full)
    assert cache.pos == 10


def test_generate_cached_equals_uncached_and_sampling_is_seeded():
    model = MoELM(lm_cfg("recurrent")).double()
    prompt = torch.randint(0, 50, (2, 5))
    greedy = generate(model, prompt, 12)
    assert greedy.shape == (2, 17) and torch.equal(greedy[:, :5], prompt)
    assert torch.equal(greedy, generate(model, prompt, 12, use_cache=False))
    a = generate(model, prompt, 12, temperature=1.0, top_p=0.9, seed=3)
    assert torch.equal(a, generate(model, prompt, 12, temperature=1.0, top_p=0.9, seed=3))
    # a nucleus smaller than the top token's probability is greedy
    assert torch.equal(generate(model, prompt, 12, temperature=1.0, top_p=1e-6, seed=1), greedy)


def test_sample_next_top_p_keeps_the_nucleus_only():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = {int(sample_next(logits, 1.0, 0.7, g)) for _ in range(200)}
    assert draws == {0, 1}  # 0.5 < 0.7 needs the second token; 0.5 + 0.3 >= 0.7 stops there
    with pytest.raises(ValueError, match="top_p"):
        sample_next(logits, 1.0, 0.0, g)
    # top_p equal to the top token's probability: the top token alone is the nucleus (here cumsum - P puts
    # the mass before the second token just below top_p, which let it in)
    logits = torch.tensor([[3.0819921493530273, -0.586857795715332, -4.357578754425049, 1.1368625164031982,
                            -2.1690447330474854]])
    top_p = float(torch.softmax(logits, -1).max())
    assert {int(sample_next(logits, 1.0, top_p, g)) for _ in range(100)} == {0}


def test_recurrent_router_state_flows_through_the_model():
    model = MoELM(lm_cfg("recurrent", n_dense=1))
    model(torch.randint(0, 50, (2, 8))).sum().backward()
    assert model.router_shared.weight_hh.grad.abs().sum() > 0  # the GRU the routers share
    # the second MoE layer's routing depends on the first one's state
    first = model.moe_layers()[0].router
    assert first.input_proj.grad.abs().sum() > 0


def test_aux_losses_are_averaged_over_moe_layers():
    model = MoELM(lm_cfg("topp"))
    model(torch.randint(0, 50, (2, 8)))
    per_layer = [layer.routing_info().aux["dynamic"] for layer in model.moe_layers()]
    torch.testing.assert_close(model.aux_losses()["dynamic"], torch.stack(per_layer).mean())
    with torch.no_grad():
        model(torch.randint(0, 50, (2, 8)))
    assert model.aux_losses() == {}


def test_clear_errors():
    ec = moekit.MoEConfig(d_expert=32, num_experts=4, router=moekit.RouterConfig(kind="expert_choice"))
    with pytest.raises(ValueError, match="not causal"):
        dataclasses.replace(lm_cfg(), moe=ec).validate()
    with pytest.raises(ValueError, match="LMConfig.n_heads"):
        lm_cfg(n_heads=5).validate()
    model = MoELM(lm_cfg())
    with pytest.raises(ValueError, match="exceed the limit of 64"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(model, torch.zeros(1, 60, dtype=torch.long), 10)


def test_tied_embeddings_share_one_tensor_and_config_round_trips():
    cfg = lm_cfg("recurrent", n_dense=1)
    model = MoELM(cfg)
    assert model.lm_head.weight is model.embed.weight
    assert LMConfig.from_dict(cfg.to_dict()) == cfg


# ------------------------------------------------ capacity never drops at evaluation or generation (issue 11, item 7)
def capacity_model(**moe_kw):
    cfg = lm_cfg("topk")
    cfg.moe = dataclasses.replace(cfg.moe, capacity_factor=0.5, **moe_kw)
    model = MoELM(cfg).double()
    with torch.no_grad():  # a peaked router, so that a capacity of 0.5 really drops in training
        for layer in model.moe_layers():
            layer.router.weight.mul_(40.0)
    return model


def test_a_sequences_logits_do_not_depend_on_its_batch_with_capacity_set():
    model = capacity_model()
    ids = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(0))
    model.train()
    model(ids)
    assert sum(layer.routing_info().num_dropped for layer in model.moe_layers()) > 0  # training drops
    model.eval()
    alone, batched = model(ids[:1]), model(ids)[:1]
    torch.testing.assert_close(batched, alone)
    assert all(layer.routing_info().num_dropped == 0 for layer in model.moe_layers())
    # the KV-cached path equals the full forward ("cached equals uncached")
    cache = KVCache(model.cfg, 2, 16, dtype=torch.float64)
    parts = [model(ids[:, :6], cache=cache)] + [model(ids[:, t:t + 1], cache=cache) for t in range(6, 12)]
    torch.testing.assert_close(torch.cat(parts, dim=1), model(ids))
    prompt = ids[:, :4]
    assert torch.equal(generate(model, prompt, 6), generate(model, prompt, 6, use_cache=False))


def test_eval_capacity_factor_drops_when_asked():
    model = capacity_model(eval_capacity_factor=0.5).eval()
    ids = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(ids)
    assert sum(layer.routing_info().num_dropped for layer in model.moe_layers()) > 0
