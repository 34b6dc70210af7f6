"""NLLB-MoE wrapped by moekit.hf (issue 14 item 2): fairseq's top-2 layer as configuration of moekit's pieces
(top-2 renormalised router, batch-wide capacity with first choices first, listed ReLU experts, the eval output
scale 1 - moe_token_dropout), checked against transformers with NllbMoeExperts.forward fixed to transformers
4.x's per-expert dispatch (scripts/hf_coverage.py: transformers 5.x's own forward runs experts 0 and 1 only)."""

from __future__ import annotations

import importlib.util
import pathlib
import warnings

import pytest
import torch

import moekit
import moekit.hf

_PATH = pathlib.Path(__file__).resolve().parents[2] / "scripts" / "hf_coverage.py"
_spec = importlib.util.spec_from_file_location("hf_coverage_nllb", _PATH)
cov = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cov)
reference = cov.nllb_experts_as_in_transformers_4  # the corrected transformers forward (test-only)

BLOCK = "NllbMoeSparseMLP"
NO_DROPOUT = dict(dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, moe_token_dropout=0.0, encoder_layerdrop=0.0,
                  decoder_layerdrop=0.0)


def _nllb(randomized, seed: int = 0, **kw):
    from transformers import AutoModelForSeq2SeqLM, NllbMoeConfig

    # encoder and decoder: layer 0 dense, layer 1 sparse (sparse_step 2); 6 experts
    values = dict(vocab_size=128, d_model=32, encoder_layers=2, decoder_layers=2, encoder_ffn_dim=48, decoder_ffn_dim=48,
                  encoder_attention_heads=4, decoder_attention_heads=4, num_experts=6, encoder_sparse_step=2,
                  decoder_sparse_step=2, pad_token_id=1, eos_token_id=2, decoder_start_token_id=2)
    values.update(kw)
    torch.manual_seed(seed)
    return randomized(AutoModelForSeq2SeqLM.from_config(NllbMoeConfig(**values)), seed).eval()


def _ids(batch: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def _blocks(model) -> list:
    return [m for m in model.modules() if type(m).__name__ == BLOCK]


def _wrap(model) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        moekit.hf.wrap(model)
    return [str(w.message) for w in caught if issubclass(w.category, UserWarning)]


def test_nllb_wraps_with_parity_against_the_authors_dispatch(randomized, keys_resolve):
    """Logits (with a padded source) to 1e-5 and 16 greedy cached tokens equal to the corrected transformers
    forward; one warning line; the model's own tensors (no copies); keys resolve; unwrap restores."""
    model = _nllb(randomized)
    ids, dec = _ids(), _ids(seed=2)[:, :7].contiguous()
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding in the second source sentence: its router drops those tokens
    blocks = _blocks(model)
    assert len(blocks) == 2  # one encoder and one decoder sparse layer
    with torch.no_grad(), reference():
        ref = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        ref_gen = model.generate(ids, attention_mask=mask, max_new_tokens=16, min_new_tokens=16, do_sample=False)
    ptrs, keys = {p.data_ptr() for p in model.parameters()}, list(model.state_dict())
    caught = _wrap(model)
    assert len(caught) == 1 and "\n" not in caught[0]
    assert "as fairseq and transformers 4.x do" in caught[0] and "only experts 0 and 1 run there" in caught[0]
    layers = moekit.hf.wrapped_blocks(model)
    assert [layer.hf_class for layer in layers] == [BLOCK, BLOCK]
    cfg = layers[0].cfg
    assert (cfg.router.describe(), cfg.capacity_scope, cfg.expert_capacity, cfg.eval_capacity_fraction,
            cfg.capacity_renormalize, cfg.expert_dropout, cfg.activation) == (
        "k=2, score=softmax, normalize=True", "batch", 64, 1.0, True, 0.2, "relu")
    assert layers[0].experts.in_proj[5] is blocks[0].experts["expert_5"].fc1  # listed experts, held in place
    assert {p.data_ptr() for p in model.parameters()} == ptrs and list(model.state_dict()) == keys
    keys_resolve(model, keys)
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        info = layers[0].routing_info()
        gen = model.generate(ids, attention_mask=mask, max_new_tokens=16, min_new_tokens=16, do_sample=False)
    assert info.num_tokens == ids.numel() - 4 and set(info.route.expert_idx_N.tolist()) > {0, 1}
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(gen, ref_gen)
    moekit.hf.unwrap(model)
    assert _blocks(model) == blocks
    with torch.no_grad(), reference():
        assert torch.equal(model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits, ref)


def test_transformers_5_forward_differs_so_the_warning_stays_true(randomized):
    """transformers 5.x's NllbMoeExperts runs experts 0 and 1 only (it one-hot encodes the mask's values):
    its logits differ from the authors' rule, which moekit runs."""
    model = _nllb(randomized)
    ids, dec = _ids(), _ids(seed=2)[:, :7].contiguous()
    ran = set()
    hooks = [m.register_forward_hook(lambda mod, a, o, n=n: ran.add(n))
             for n, m in _blocks(model)[0].experts.items() if n.startswith("expert_")]
    with torch.no_grad():
        buggy = model(input_ids=ids, decoder_input_ids=dec).logits
    assert ran == {"expert_0", "expert_1"}
    with torch.no_grad(), reference():
        ran.clear()
        ref = model(input_ids=ids, decoder_input_ids=dec).logits
    for h in hooks:
        h.remove()
    assert len(ran) > 2
    _wrap(model)
    with torch.no_grad():
        got = model(input_ids=ids, decoder_input_ids=dec).logits
    assert (got - buggy).abs().max() > 1e-2 and torch.allclose(got, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("setting", [{}, {"batch_prioritized_routing": True},
                                     {"normalize_router_prob_before_dropping": True}])
def test_training_capacity_drops_exactly_as_the_reference(randomized, setting):
    """Training mode (dropout 0): capacity over the flattened batch, first choices first, drops the same
    assignments (logits and their gradients to 1e-5); capacity 3 for 24 tokens and 6 experts drops some."""
    kw = {"expert_capacity": 3, **setting}
    model = _nllb(randomized, **NO_DROPOUT, **kw).train()
    ids, dec = _ids(), _ids(seed=2)[:, :7].contiguous()
    with reference():  # a fresh model: transformers' router has not yet overwritten its capacity in eval
        ref = model(input_ids=ids, decoder_input_ids=dec).logits
    ref.square().sum().backward()
    ref_grad = model.model.encoder.layers[1].ffn.router.classifier.weight.grad.clone()
    model.zero_grad()
    _wrap(model)
    layers = moekit.hf.wrapped_blocks(model)
    assert layers[0].training and layers[0].cfg.capacity_priority == (
        "score" if setting.get("batch_prioritized_routing") else "token")
    got = model(input_ids=ids, decoder_input_ids=dec).logits
    got.square().sum().backward()
    assert layers[0].routing_info().num_dropped > 0
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layers[0].router.weight.grad, ref_grad, atol=1e-4, rtol=1e-4)


def test_eval_capacity_fraction_drops_exactly_as_the_reference(randomized):
    """moe_eval_capacity_token_fraction 0.25: in eval, C = ceil(0.25 * T) per expert, which drops."""
    model = _nllb(randomized, moe_eval_capacity_token_fraction=0.25)
    ids, dec = _ids(), _ids(seed=2)[:, :7].contiguous()
    with torch.no_grad(), reference():
        ref = model(input_ids=ids, decoder_input_ids=dec).logits
    _wrap(model)
    with torch.no_grad():
        got = model(input_ids=ids, decoder_input_ids=dec).logits
    assert moekit.hf.wrapped_blocks(model)[0].routing_info().num_dropped > 0
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_output_router_logits_and_aux_losses_equal(randomized):
    model = _nllb(randomized)
    ids, dec = _ids(), _ids(seed=2)[:, :7].contiguous()
    with torch.no_grad(), reference():
        ref = model(input_ids=ids, decoder_input_ids=dec, labels=dec, output_router_logits=True)
    _wrap(model)
    with torch.no_grad():
        got = model(input_ids=ids, decoder_input_ids=dec, labels=dec, output_router_logits=True)
    for name in ("encoder_router_logits", "decoder_router_logits"):
        assert [t.shape for t in getattr(got, name)] == [t.shape for t in getattr(ref, name)]
        for a, b in zip(getattr(got, name), getattr(ref, name), strict=True):
            torch.testing.assert_close(a, b)
    for name in ("loss", "encoder_aux_loss", "decoder_aux_loss"):
        torch.testing.assert_close(getattr(got, name), getattr(ref, name))


def test_wrap_leaves_the_routers_capacity_attribute_alone(randomized):
    """The parity probe runs the block in eval mode, which makes transformers' router keep the eval capacity as
    its own `expert_capacity` (then used in training); wrap puts it back."""
    model = _nllb(randomized)
    router = _blocks(model)[0].router
    _wrap(model)
    moekit.hf.unwrap(model)
    assert router.expert_capacity == 64


def test_a_low_precision_router_dtype_is_refused_in_one_line(randomized):
    model = _nllb(randomized, router_dtype="bfloat16")
    with pytest.raises(moekit.hf.UnsupportedBlockError, match=r"NllbMoeSparseMLP: its router computes its softmax in "
                                                              r"torch.bfloat16 \(router_dtype\); moekit's gate math is fp32"):
        moekit.hf.wrap(model)


@pytest.mark.parametrize("policy", ["sampling", "random"])
def test_sampled_second_expert_matches_the_reference_draw_for_draw(randomized, policy):
    """second_expert_policy 'sampling' (Gumbel-max over the other logits) and 'random' (the next best kept with
    probability 2p) sample in eval too: under the same seed the wrapped model draws what transformers draws
    (logits to 1e-5), and another seed gives other logits (the draws matter)."""
    model = _nllb(randomized, second_expert_policy=policy)
    ids, dec = _ids(), _ids(seed=2)[:, :7].contiguous()
    with torch.no_grad(), reference():
        torch.manual_seed(5)
        ref = model(input_ids=ids, decoder_input_ids=dec).logits
        torch.manual_seed(6)
        other = model(input_ids=ids, decoder_input_ids=dec).logits
    _wrap(model)
    layer = moekit.hf.wrapped_blocks(model)[0]
    assert layer.cfg.router.second_expert == policy
    with torch.no_grad():
        torch.manual_seed(5)
        got = model(input_ids=ids, decoder_input_ids=dec).logits
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert (other - ref).abs().max() > 1e-2
    per_token = layer.routing_info().experts_per_token_T
    assert set(per_token.tolist()) == ({1, 2} if policy == "random" else {2})


def test_random_policy_with_normalise_before_dropping_is_refused_in_one_line(randomized):
    model = _nllb(randomized, second_expert_policy="random", normalize_router_prob_before_dropping=True)
    with pytest.raises(moekit.hf.UnsupportedBlockError, match=r"NllbMoeSparseMLP: its router's second_expert_policy="
                                                              r"'random' with normalize_router_prob_before_dropping"):
        moekit.hf.wrap(model)


def test_rerouting_and_masks_on_wrapped_nllb(randomized):
    """Top-p and expert masks run on the wrapped model (eval capacity T per expert: nothing drops)."""
    model = _nllb(randomized)
    _wrap(model)
    ids, dec = _ids(), _ids(seed=2)[:, :7].contiguous()
    layer = moekit.hf.wrapped_blocks(model)[0]
    with torch.no_grad():
        base = model(input_ids=ids, decoder_input_ids=dec).logits
        with moekit.route(model, kind="topp", p=0.5):
            out = model(input_ids=ids, decoder_input_ids=dec).logits
            per_token = layer.routing_info().experts_per_token_T
        assert len(set(per_token.tolist())) > 1 and not torch.allclose(out, base)
        with moekit.mask_experts(model, disabled={0: [2, 3]}):
            model(input_ids=ids, decoder_input_ids=dec)
            idx = layer.routing_info().route.expert_idx_N
        assert not bool(((idx == 2) | (idx == 3)).any())
        torch.testing.assert_close(model(input_ids=ids, decoder_input_ids=dec).logits, base, rtol=0, atol=0)


@pytest.mark.parametrize(("capacity", "want_c"), [(2, 2), (None, 8)])
def test_batch_capacity_ranks_first_choices_first(capacity, want_c):
    """MoEConfig(capacity_scope='batch') against a hand count: per expert, every first choice before any second
    choice, each in token order; C = expert_capacity, or 2 * ceil(T / E) = 8 for top-2 of 10 tokens on 3 experts
    without one; kept weights renormalised; in eval, C = ceil(eval_capacity_fraction * T)."""
    cfg = moekit.MoEConfig(d_model=8, d_expert=8, num_experts=3, activation="relu", expert_capacity=capacity,
                           capacity_scope="batch", capacity_renormalize=True, eval_capacity_fraction=0.25,
                           router=moekit.RouterConfig(kind="topk", k=2, normalize=True))
    layer = moekit.MoELayer(cfg).train()
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(0))
    x[..., 0] = x[..., 0].abs() + 0.5
    with torch.no_grad():  # expert 0 is every token's first choice and expert 1 most tokens' second: C = 8 drops too
        layer.router.weight[0, 0] += 6.0
        layer.router.weight[1, 0] += 3.0
    layer(x)
    info = layer.routing_info()
    idx_TK, w_TK = info.route.to_padded()
    order_TK = w_TK.argsort(-1, descending=True)
    idx_TK, w_TK = idx_TK.gather(1, order_TK), w_TK.gather(1, order_TK)
    seen, keep = [0, 0, 0], torch.zeros(10, 2, dtype=torch.bool)
    for slot in range(2):
        for t in range(10):
            e = int(idx_TK[t, slot])
            keep[t, slot] = seen[e] < want_c
            seen[e] += 1
    assert info.num_dropped == int((~keep).sum()) > 0
    executed = {(int(t), int(e)): float(w) for t, e, w in
                zip(info.executed.token_idx_N, info.executed.expert_idx_N, info.executed.weight_N, strict=True)}
    want = {(t, int(idx_TK[t, s])): float(w_TK[t, s] / (w_TK[t] * keep[t]).sum())
            for t in range(10) for s in range(2) if keep[t, s]}
    assert executed.keys() == want.keys()
    assert all(abs(executed[k] - want[k]) < 1e-6 for k in want)
    layer.eval()
    with torch.no_grad():
        layer(x)
    assert int(layer.routing_info().counts_E.max()) == 3  # ceil(0.25 * 10)


def test_expert_dropout_in_training_and_its_eval_scale():
    """expert_dropout p: training zeroes expert output elements and scales the rest by 1 / (1 - p) (one expert,
    top-1: each element is 0 or 2x the plain output); eval scales the output by 1 - p."""
    plain = moekit.MoELayer(moekit.MoEConfig(d_model=8, d_expert=8, num_experts=1, activation="relu",
                                             router=moekit.RouterConfig(kind="topk", k=1)))
    drop = moekit.MoELayer(moekit.MoEConfig(d_model=8, d_expert=8, num_experts=1, activation="relu", expert_dropout=0.5,
                                            router=moekit.RouterConfig(kind="topk", k=1)))
    drop.load_state_dict(plain.state_dict())
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = plain(x)
        torch.manual_seed(0)
        got = drop.train()(x)
        torch.testing.assert_close(drop.eval()(x), 0.5 * want)
    zero = got == 0
    assert 0.3 < float(zero[want != 0].float().mean()) < 0.7
    torch.testing.assert_close(got[~zero], 2 * want[~zero])


def test_expert_hidden_dropout_is_read_from_the_expert_mlps(randomized):
    """NLLB-MoE's expert MLPs drop their hidden activations in training (activation_dropout): the wrapped bank
    does too, the same draws as the expert module itself under the same seed; eval is exact."""
    model = _nllb(randomized, activation_dropout=0.5)
    expert = _blocks(model)[0].experts["expert_0"]
    _wrap(model)
    layer = moekit.hf.wrapped_blocks(model)[0]
    assert layer.cfg.expert_hidden_dropout == 0.5 and layer.experts.hidden_dropout == 0.5
    bank = layer.experts.train()
    expert.train()
    x_ND = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    offsets_E = torch.full((6,), 64, dtype=torch.int32)  # every row through expert 0
    with torch.no_grad():
        torch.manual_seed(3)
        y_ND = bank(x_ND, offsets_E)
        torch.manual_seed(3)
        want = expert(x_ND)  # the HF module: fc1, ReLU, dropout, fc2
        plain = expert.eval()(x_ND)
        torch.testing.assert_close(y_ND, want)
        assert not torch.allclose(y_ND, plain)
        torch.testing.assert_close(bank.eval()(x_ND, offsets_E), plain)


def test_a_router_that_ignores_padding_keeps_padded_tokens_routed(randomized):
    """router_ignore_padding_tokens=True: transformers' router routes the padding tokens too (the probe reads
    that), and so does the wrapped block; logits with a padded source equal the reference."""
    model = _nllb(randomized, router_ignore_padding_tokens=True)
    ids, dec = _ids(), _ids(seed=2)[:, :7].contiguous()
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0
    with torch.no_grad(), reference():
        ref = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    _wrap(model)
    layer = moekit.hf.wrapped_blocks(model)[0]
    assert not layer.reads_padding_mask
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    assert layer.routing_info().num_tokens == ids.numel()
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_bf16_wrap_matches_bf16_reference(randomized):
    model = _nllb(randomized).to(torch.bfloat16)
    ids, dec = _ids(), _ids(seed=2)[:, :7].contiguous()
    with torch.no_grad(), reference():
        ref = model(input_ids=ids, decoder_input_ids=dec).logits.float()
    _wrap(model)
    with torch.no_grad():
        got = model(input_ids=ids, decoder_input_ids=dec).logits.float()
    assert float((got - ref).norm() / ref.norm()) < 2e-2
