"""A wrapped model computes what transformers computes: full-prompt logits to 1e-5 and greedy
generation with the KV cache token for token, for every supported family (fp32, CPU)."""

from __future__ import annotations

import pytest
import torch

import moekit
import moekit.hf
from moekit.ops import grouped
from moekit.ops.reference import ReferenceExperts

TOL = {"atol": 1e-5, "rtol": 1e-5}
NEW_TOKENS = 32


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _generate(model, ids):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                              use_cache=True, pad_token_id=0)


@pytest.mark.parametrize("path", ["kernel", "loop", "loop_wx", "reference"])
def test_logits_match_transformers(family, path, make_model, prompt, hf_blocks):
    """moekit's grouped GEMMs forced to the kernel, the loop or the weight-first loop (asserted), or the reference
    loop."""
    model = make_model(family)
    ids = prompt()
    ref = _logits(model, ids)
    moekit.hf.wrap(model)
    blocks = moekit.hf.wrapped_blocks(model)
    if path == "reference":  # the oracle's experts (moekit.ops.reference) in every wrapped layer
        for b in blocks:
            b.experts = ReferenceExperts(b.experts)
    cls_name, n_blocks = hf_blocks[family]
    assert [b.hf_class for b in blocks] == [cls_name] * n_blocks
    with grouped.record() if path == "reference" else grouped.force(path) as ran:
        out = _logits(model, ids)
    assert ran == ({} if path == "reference" else {("forward", path): 2 * n_blocks})
    assert ref.abs().max() > 1.0  # real, spread logits, not a zero-vs-zero comparison
    torch.testing.assert_close(out, ref, **TOL)
    # The logits really come from moekit: every wrapped layer ran on all prompt tokens.
    assert all(b.routing_info().num_tokens == ids.numel() for b in blocks)


def test_greedy_generation_with_kv_cache_matches_transformers(family, make_model, prompt, monkeypatch):
    # These tiny experts are under the weight-first loop's size floor; lowered, decoding runs that loop, and its
    # tokens are compared with transformers' here.
    monkeypatch.setattr(grouped, "CPU_WX_MIN_WEIGHT_BYTES", 0)
    model = make_model(family)
    ids = prompt(batch=2, length=6)
    ref = _generate(model, ids)
    assert ref.shape == (2, 6 + NEW_TOKENS)
    assert len(set(ref[0, 6:].tolist())) > 3  # not a degenerate repeat of one token
    moekit.hf.wrap(model)
    with grouped.record() as ran:
        out = _generate(model, ids)
    assert torch.equal(out, ref)
    # Decoding (2 tokens a step) runs the path the CPU rules pick for 2k rows over E experts: "loop_wx" (these
    # families store their experts (O, I)) while rows <= CPU_WX_ROWS_PER_EXPERT * E, else the kernel unless
    # rows * CPU_KERNEL_ROWS_PER_EXPERT < E; each path's forward is compared in test_logits_match_transformers.
    layer = moekit.hf.wrapped_blocks(model)[0]
    rows, E = 2 * round(layer.cfg.router.expected_experts_per_token(layer.cfg.num_experts)), layer.cfg.num_experts
    path = ("loop_wx" if rows <= grouped.CPU_WX_ROWS_PER_EXPERT * E else
            "kernel" if rows * grouped.CPU_KERNEL_ROWS_PER_EXPERT >= E else "loop")
    assert path == "loop_wx"  # the decode-speed path is the one compared token for token here
    assert ran["forward", path] >= 2 * (NEW_TOKENS - 1)
    # The last decoding step went through moekit with the KV cache: one new token per sequence.
    assert moekit.hf.wrapped_blocks(model)[0].routing_info().num_tokens == 2


def test_routing_matches_the_transformers_router(family, make_model, prompt, hf_blocks):
    """Not only the output: each layer picks the experts transformers' own router picks, with its weights."""
    model = make_model(family)
    hf_blocks = [m for m in model.modules() if type(m).__name__ == hf_blocks[family][0]]
    hf_picks = []
    hooks = [b.gate.register_forward_hook(lambda _m, _a, out: hf_picks.append((out[2], out[1]))) for b in hf_blocks]
    ids = prompt()
    _logits(model, ids)
    for h in hooks:
        h.remove()
    moekit.hf.wrap(model)
    _logits(model, ids)
    for layer, (hf_idx, hf_w) in zip(moekit.hf.wrapped_blocks(model), hf_picks, strict=True):
        idx, w = layer.routing_info().route.to_padded()
        order, hf_order = idx.argsort(-1), hf_idx.argsort(-1)
        assert torch.equal(idx.gather(1, order), hf_idx.gather(1, hf_order))
        torch.testing.assert_close(w.gather(1, order), hf_w.float().gather(1, hf_order), **TOL)


def test_output_router_logits_and_aux_loss_match_transformers(make_model, prompt):
    """`output_router_logits=True` (training with transformers' balance loss) sees moekit's router logits."""
    model = make_model("mixtral", router_aux_loss_coef=0.02)
    ids = prompt()
    ref = model(ids, labels=ids, output_router_logits=True)
    moekit.hf.wrap(model)
    out = model(ids, labels=ids, output_router_logits=True)
    assert len(out.router_logits) == len(ref.router_logits) == 2
    for got, want in zip(out.router_logits, ref.router_logits, strict=True):
        torch.testing.assert_close(got, want, **TOL)
    assert ref.aux_loss > 0
    torch.testing.assert_close(out.aux_loss, ref.aux_loss, **TOL)
    torch.testing.assert_close(out.loss, ref.loss, **TOL)
    out.loss.backward()  # the aux loss reaches the shared router weight
    gate = moekit.hf.wrapped_blocks(model)[0].router.weight
    assert gate.grad is not None and gate.grad.abs().max() > 0


def test_gradients_match_transformers(make_model, prompt):
    model = make_model("qwen2_moe")
    ids = prompt()
    model(ids, labels=ids).loss.backward()
    ref = {n: (p, p.grad.clone()) for n, p in model.named_parameters()}
    model.zero_grad()
    moekit.hf.wrap(model)
    with grouped.record() as ran:
        model(ids, labels=ids).loss.backward()
    assert ran["dx", "kernel"] > 0 and ran["dw", "kernel"] > 0  # the kernel's gradients are what is compared
    # Named by the original model (the Parameters are the same objects, under new module paths).
    for n, (p, want) in ref.items():
        assert want.abs().max() > 0, n
        torch.testing.assert_close(p.grad, want, atol=1e-4, rtol=1e-4, msg=lambda m, n=n: f"{n}: {m}")


def test_bf16_model_wraps_and_stays_bf16(make_model, prompt):
    model = make_model("olmoe").to(torch.bfloat16)
    ids = prompt()
    ref = _logits(model, ids).float()
    moekit.hf.wrap(model)  # the probe check passes in low precision too
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    out = _logits(model, ids).float()
    # moekit keeps router math in fp32 where transformers rounds OLMoE's logits to bf16: close, not equal.
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9
    assert (out - ref).abs().max() < 0.1 * ref.abs().max()
