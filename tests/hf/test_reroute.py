"""Re-routing a wrapped pretrained model through moekit's own calls (route, mask_experts,
routing_info), and the guarantee that none of it touches a weight."""

from __future__ import annotations

import hashlib

import pytest
import torch

import moekit
import moekit.hf


def _run(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_topp_routing_on_a_pretrained_model(make_model, prompt):
    model = moekit.hf.wrap(make_model("qwen3_moe"))
    ids = prompt()
    base = _run(model, ids)
    layers = moekit.hf.wrapped_blocks(model)
    with moekit.route(model, kind="topp", p=0.6) as changed:
        assert changed == layers and all(layer.router.kind == "topp" for layer in layers)
        out = _run(model, ids)
        per_token = layers[0].routing_info().experts_per_token_T
    assert all(layer.router.kind == "topk" for layer in layers)  # restored on exit
    assert per_token.min() >= 1 and per_token.max() > 1 and len(set(per_token.tolist())) > 1  # really dynamic
    assert not torch.allclose(out, base)
    torch.testing.assert_close(_run(model, ids), base, rtol=0, atol=0)


def test_topp_with_a_tiny_p_is_top1_with_raw_weights(make_model, prompt):
    """Invariant: top-p with p below every max probability picks one expert with its raw probability,
    which is top-1 without renormalisation."""
    model = moekit.hf.wrap(make_model("olmoe"))
    ids = prompt()
    with moekit.route(model, kind="topp", p=1e-6):
        topp = _run(model, ids)
    with moekit.route(model, k=1, normalize=False):
        top1 = _run(model, ids)
    torch.testing.assert_close(topp, top1, rtol=0, atol=0)


def test_per_layer_k(make_model, prompt):
    model = moekit.hf.wrap(make_model("deepseek_v3"))
    ids = prompt()
    with moekit.route(model, k=[1, 4]):
        _run(model, ids)
        counts = [layer.routing_info().experts_per_token_T for layer in moekit.hf.wrapped_blocks(model)]
    assert counts[0].unique().tolist() == [1] and counts[1].unique().tolist() == [4]
    with moekit.route(model, layers=[1], k=3):
        _run(model, ids)
        assert moekit.hf.wrapped_blocks(model)[1].routing_info().experts_per_token_T.unique().tolist() == [3]
        assert moekit.hf.wrapped_blocks(model)[0].routing_info().experts_per_token_T.unique().tolist() == [2]
    # DeepSeek-V3's group limit still holds: 4 experts must fit in topk_group=2 groups of 2.
    with pytest.raises(ValueError, match="k=5 is invalid with topk_group=2"):
        with moekit.route(model, k=5):
            pass


def test_null_experts_on_a_pretrained_router(make_model, prompt):
    model = moekit.hf.wrap(make_model("mixtral"))
    ids = prompt()
    layers = moekit.hf.wrapped_blocks(model)
    gate = layers[0].router.weight
    with moekit.route(model, kind="null", n_null=6, k=3):
        router = layers[0].router
        assert router.kind == "null" and router.weight is gate  # the pretrained gate, shared
        _run(model, ids)
        info = layers[0].routing_info()
        assert info.num_null > 0 and 0 < info.null_rate() < 1
        assert info.experts_per_token_T.max() <= 3
    assert layers[0].router.kind == "topk" and layers[0].router.weight is gate
    assert "null_weight" not in "".join(model.state_dict())


def test_null_rows_are_tiled_from_the_pretrained_gate(make_model):
    model = moekit.hf.wrap(make_model("mixtral"))
    with moekit.route(model, kind="null", n_null=8, k=3):
        router = moekit.hf.wrapped_blocks(model)[0].router
        rows = torch.arange(8) % router.num_experts
        torch.testing.assert_close(router.null_weight, router.weight[rows].to(router.null_weight.dtype))


def test_routing_info_records_every_layer(make_model, prompt):
    model = moekit.hf.wrap(make_model("qwen2_moe"))
    ids = prompt(batch=3, length=5)
    _run(model, ids)
    for layer in moekit.hf.wrapped_blocks(model):
        stats = layer.routing_info().stats()
        assert stats["tokens"] == 15 and stats["experts_per_token_mean"] == 2.0
        assert sum(stats["counts"]) == 30 and len(stats["counts"]) == 8


# ------------------------------------------------------------------------------------------- masks
def test_disabled_experts_never_run_and_others_are_untouched(make_model, prompt):
    """Mixtral renormalises the top-k, so disabling an expert leaves every token that did not pick
    it exactly as it was (the softmax denominator cancels)."""
    model = moekit.hf.wrap(make_model("mixtral"))
    ids = prompt()
    _run(model, ids)
    layer = moekit.hf.wrapped_blocks(model)[0]
    idx0, w0 = layer.routing_info().route.to_padded()
    victim = int(idx0.flatten().mode().values)
    with moekit.mask_experts(model, disabled={0: [victim]}) as masked:
        assert masked == [layer]
        _run(model, ids)
        idx1, w1 = layer.routing_info().route.to_padded()
    assert not (idx1 == victim).any() and (idx0 == victim).any()
    untouched = ~(idx0 == victim).any(-1)
    assert untouched.any()
    assert torch.equal(idx1[untouched], idx0[untouched])
    torch.testing.assert_close(w1[untouched], w0[untouched], rtol=0, atol=1e-7)
    assert layer.router.expert_mask_E is None  # undone on exit


def test_masks_on_deepseek_apply_to_the_biased_scores(make_model, prompt):
    model = moekit.hf.wrap(make_model("deepseek_v3"))
    ids = prompt()
    layer = moekit.hf.wrapped_blocks(model)[1]
    with torch.no_grad():
        layer.router.e_score_correction_bias[5] = 10.0  # the bias alone would put expert 5 everywhere
    _run(model, ids)
    assert (layer.routing_info().route.to_padded()[0] == 5).any(-1).all()
    with moekit.mask_experts(model, disabled={1: [5]}, forced={1: [0]}):
        _run(model, ids)
        idx, w = layer.routing_info().route.to_padded()
    assert not (idx == 5).any()
    assert (idx == 0).any(-1).all()
    # Weights stay the normalised, scaled *unbiased* sigmoid scores of the chosen experts.
    torch.testing.assert_close(w.sum(-1), torch.full((ids.numel(),), 2.5))
    scores = layer.routing_info().route.scores_TE
    torch.testing.assert_close(w, 2.5 * scores.gather(1, idx) / scores.gather(1, idx).sum(-1, keepdim=True))


def test_mask_errors_name_the_problem(make_model):
    model = moekit.hf.wrap(make_model("deepseek_v3"))
    with pytest.raises(ValueError, match="layer 2 is out of range; the model has 2 MoE layers"):
        with moekit.mask_experts(model, disabled={2: [0]}):
            pass
    with pytest.raises(ValueError, match=r"expert ids \[8\] are out of range; allowed: 0..7"):
        with moekit.mask_experts(model, disabled={0: [8]}):
            pass
    with pytest.raises(ValueError, match="3 forced experts do not fit in k=2 slots"):
        with moekit.mask_experts(model, forced={0: [0, 1, 2]}):
            pass
    with moekit.route(model, k=4), pytest.raises(ValueError, match="forced experts lie in 3 groups"):
        with moekit.mask_experts(model, forced={0: [0, 2, 4]}):
            pass
    softmax_model = moekit.hf.wrap(make_model("olmoe"))  # a sigmoid rule does not convert to 'random'
    with moekit.route(softmax_model, kind="random"):
        with pytest.raises(ValueError, match="router kind 'random', whose selection rule does not rank forced"):
            with moekit.mask_experts(softmax_model, forced={0: [1]}):
                pass


# ------------------------------------------------------------------------------ weights never change
def _digests(directory) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.glob("*.safetensors"))}


def test_rerouting_never_modifies_the_weights(make_model, prompt, tmp_path):
    model = make_model("deepseek_v3")
    ref_state = {k: v.clone() for k, v in model.state_dict().items()}
    model.save_pretrained(tmp_path / "before")
    ids = prompt()

    moekit.hf.wrap(model)
    model.save_pretrained(tmp_path / "wrapped")  # a wrapped model saves as the original
    with moekit.route(model, kind="topp", p=0.5):  # converted: the score carries over, the groups do not
        _run(model, ids)
    with moekit.route(model, k=[1, 4]):
        _run(model, ids)
    with moekit.route(model, kind="topp", p=0.9, normalize=False, routed_scaling_factor=1.0):
        _run(model, ids)
    with moekit.mask_experts(model, disabled={0: [1, 2]}, forced={1: [3]}):
        with torch.no_grad():
            model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    model.train()
    model(ids, labels=ids).loss.backward()  # gradients, but no optimiser step
    moekit.after_optimizer_step(model)  # no selection-bias update for a pretrained router
    model.eval()
    moekit.hf.unwrap(model)
    model.save_pretrained(tmp_path / "after")

    before = _digests(tmp_path / "before")
    assert before and _digests(tmp_path / "after") == before and _digests(tmp_path / "wrapped") == before
    state = model.state_dict()
    assert list(state) == list(ref_state)
    assert all(torch.equal(state[k], v) for k, v in ref_state.items())


def test_topp_on_a_sigmoid_family_uses_the_normalised_affinities(make_model, prompt):
    """DeepSeek-V3 (sigmoid scores, renormalised, x2.5): top-p keeps the rule's score, normalisation and
    scale; the mass is that of s / sum(s) per token, the weights the renormalised raw s, times the scale."""
    model = moekit.hf.wrap(make_model("deepseek_v3"))
    ids = prompt()
    with moekit.route(model, kind="topp", p=0.3):
        layer = moekit.hf.wrapped_blocks(model)[0]
        assert layer.router.cfg.score == "sigmoid" and layer.router.cfg.routed_scaling_factor == 2.5
        _run(model, ids)
        info = layer.routing_info()
    s_TE = torch.sigmoid(info.route.logits_TE)
    a_TE = s_TE / s_TE.sum(-1, keepdim=True)
    idx_TK, w_TK = info.route.to_padded()
    for t in range(s_TE.shape[0]):
        order = torch.argsort(a_TE[t], descending=True, stable=True)
        before = torch.cumsum(a_TE[t][order], 0) - a_TE[t][order]
        want = order[before <= 0.3]
        got = idx_TK[t][idx_TK[t] >= 0]
        assert sorted(got.tolist()) == sorted(want.tolist())
        w = s_TE[t, want] / s_TE[t, want].sum() * 2.5
        torch.testing.assert_close(w_TK[t][: len(got)].sort().values, w.sort().values, rtol=1e-5, atol=1e-6)
    assert info.experts_per_token_T.max() > 1  # dynamic, not top-1
    # p -> 0: one expert per token (the best affinity), weight = the scale after renormalisation
    with moekit.route(model, kind="topp", p=1e-6):
        _run(model, ids)
        info = moekit.hf.wrapped_blocks(model)[0].routing_info()
    assert info.experts_per_token_T.max() == 1
    assert torch.equal(info.route.expert_idx_N, torch.sigmoid(info.route.logits_TE).argmax(-1))
    torch.testing.assert_close(info.route.weight_N, torch.full_like(info.route.weight_N, 2.5))


def test_null_experts_on_a_sigmoid_family_are_refused_naming_why(make_model):
    model = moekit.hf.wrap(make_model("deepseek_v3"))
    with pytest.raises(ValueError, match=r"kind='null'.* softmax .*score='sigmoid' rule cannot be converted"):
        with moekit.route(model, kind="null", n_null=4, k=3):
            pass
    assert all(layer.router.kind == "topk" for layer in moekit.hf.wrapped_blocks(model))  # nothing changed


def test_a_selection_bias_trained_on_a_wrapped_model_saves_and_loads_back(make_model, prompt):
    # A softmax family's wrapped router holds no selection bias; aux-loss-free balancing through moekit.route makes
    # one (update_bias). The model's state_dict holds it, and a freshly wrapped model loads it back (strict).
    ids = prompt()
    trained, fresh = make_model("mixtral"), make_model("mixtral")
    moekit.hf.wrap(trained)
    moekit.hf.wrap(fresh)
    with moekit.route(trained, bias_update_rate=1.0):
        for layer in moekit.hf.wrapped_blocks(trained):
            layer.router.update_bias(torch.tensor([9, 0, 0, 0, 0, 9]))  # experts 0 and 5 overloaded
    fresh.load_state_dict(trained.state_dict())
    for a, b in zip(moekit.hf.wrapped_blocks(trained), moekit.hf.wrapped_blocks(fresh), strict=True):
        assert b.router.e_score_correction_bias is not None
        assert torch.equal(a.router.e_score_correction_bias, b.router.e_score_correction_bias)
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, trained(ids).logits)


def test_a_model_rerouted_to_another_kind_keeps_the_routers_state_in_its_checkpoint(make_model, tmp_path):
    """`moekit.route(model, kind="topp")` as a statement (it stays in force) on DeepSeek-V3: the top-p router does
    not use the selection bias, but the model still holds it. Its state_dict (and so save_pretrained) kept dropping
    `gate.e_score_correction_bias` (a checkpoint that reloads with a zero bias, silently), and `moekit.hf.unwrap` /
    the offloaded runtime (`HFMoEBlock.original`) failed with KeyError: 'e_score_correction_bias'."""
    model = make_model("deepseek_v3")
    ref_state = {k: v.clone() for k, v in model.state_dict().items()}
    moekit.hf.wrap(model)
    moekit.route(model, kind="topp", p=0.5)
    assert all(layer.router.kind == "topp" for layer in moekit.hf.wrapped_blocks(model))
    state = model.state_dict()
    assert sorted(state) == sorted(ref_state)
    model.save_pretrained(tmp_path / "rerouted")
    from safetensors import safe_open
    with safe_open(str(tmp_path / "rerouted" / "model.safetensors"), "pt") as f:
        assert sum("e_score_correction_bias" in k for k in f.keys()) == 2
    moekit.hf.unwrap(model)  # KeyError before the fix
    state = model.state_dict()
    assert list(state) == list(ref_state) and all(torch.equal(state[k], v) for k, v in ref_state.items())


def test_hash_routing_is_refused_where_the_block_gets_no_token_ids(make_model, prompt):
    """Hash routing reads the token ids, which transformers hands to the MoE blocks of hash-routed families
    (DeepSeek-V4) only. `route(kind="hash")` on a wrapped Mixtral was accepted and every forward then failed with
    "pass the T tokens' ids as the MoE layer's router_state (got NoneType)" (`moekit generate --route hash`: that
    line, not naming --route, after the expert store was written); it is refused before anything changes."""
    model = moekit.hf.wrap(make_model("mixtral"))
    with pytest.raises(ValueError, match=r"route\(kind='hash'\).*token ids"):
        moekit.route(model, kind="hash", vocab_size=128)
    assert all(layer.router.kind == "topk" for layer in moekit.hf.wrapped_blocks(model))
    _run(model, prompt())
