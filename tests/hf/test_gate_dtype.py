"""A wrapped model runs its routers' gate linear in the dtype transformers' router runs it in (RouterConfig.gate_dtype,
read by `moekit.hf.wrap` from each router's own call): the model dtype where transformers calls
`F.linear(hidden_states, self.weight)` (Mixtral, Qwen3-MoE, OLMoE, gpt-oss), fp32 where it upcasts first
(DeepSeek-V3's `F.linear(hidden_states.type(torch.float32), self.weight.type(torch.float32))`). In bf16 the logits
are then transformers' bit for bit, so exact bf16 ties pick the experts transformers picks (an fp32 gate would
break them by the fp32 values and re-route the token)."""

from __future__ import annotations

import pytest
import torch

import moekit.hf

_BASE = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2, head_dim=8)
_MORE = {
    "gpt_oss": dict(intermediate_size=48, num_local_experts=6, num_experts_per_tok=2,
                    layer_types=["full_attention", "sliding_attention"], sliding_window=16),
    "hunyuan_v1_moe": dict(intermediate_size=48, num_experts=6, moe_topk=2),
}
# family -> the gate_dtype wrap reads from its transformers router
GATE_DTYPES = {"mixtral": "weight", "qwen3_moe": "weight", "olmoe": "weight", "gpt_oss": "weight",
               "deepseek_v3": "float32", "hunyuan_v1_moe": "weight"}


@pytest.fixture
def build(make_model, build_causal):
    def make(family: str) -> torch.nn.Module:
        return build_causal(family, **{**_BASE, **_MORE[family]}) if family in _MORE else make_model(family)
    return make


def _hf_gates(model) -> list[torch.nn.Module]:
    """The transformers routers of the wrapped blocks (sharing their Parameters with moekit's routers)."""
    blocks = [layer.original() for layer in moekit.hf.wrapped_blocks(model)]
    return [getattr(block, "gate", None) or block.router for block in blocks]  # gpt-oss names it `router`


def _hf_logits(gate: torch.nn.Module, x_TD: torch.Tensor) -> torch.Tensor:
    """The (T, E) logits transformers' router returns (the first (T, E) output)."""
    out = gate(x_TD)
    return next(t for t in (out if isinstance(out, tuple) else (out,)) if t.shape == (x_TD.shape[0], gate_rows(gate)))


def gate_rows(gate: torch.nn.Module) -> int:
    return next(p for p in gate.parameters() if p.dim() == 2).shape[0]


@pytest.mark.parametrize("family", list(GATE_DTYPES))
def test_wrap_reads_the_gate_dtype_of_the_transformers_router(family, build):
    model = build(family)
    moekit.hf.wrap(model)
    assert {layer.router.cfg.gate_dtype for layer in moekit.hf.wrapped_blocks(model)} == {GATE_DTYPES[family]}


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "olmoe", "gpt_oss", "deepseek_v3"])
def test_bf16_router_logits_equal_transformers_bit_for_bit(family, build):
    model = build(family).to(torch.bfloat16)
    moekit.hf.wrap(model)
    x_TD = torch.randn(64, model.config.hidden_size, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    layers = moekit.hf.wrapped_blocks(model)
    for layer, gate in zip(layers, _hf_gates(model), strict=True):
        with torch.no_grad():
            want = _hf_logits(gate, x_TD)
            got = layer.router(x_TD).logits_TE
        assert got.dtype == torch.float32  # moekit's logits stay fp32: the bf16 ones, upcast exactly
        assert torch.equal(got, want.float())


def test_a_fp32_hunyuan_gate_in_a_bf16_model_runs_in_fp32(build):
    """transformers builds HunYuan's gate in fp32 (`nn.Linear(..., dtype=torch.float32)`) and runs it in its weight's
    dtype (`if self.wg.weight.dtype == torch.float32: hidden_states = hidden_states.float()`): a bf16 model whose
    gate kept its fp32 weight routes on fp32 logits, a fully cast one on bf16 logits; the wrapped router follows."""
    model = build("hunyuan_v1_moe").to(torch.bfloat16)
    moekit.hf.wrap(model)
    x_TD = torch.randn(64, model.config.hidden_size, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    for layer, gate in zip(moekit.hf.wrapped_blocks(model), _hf_gates(model), strict=True):
        for dtype in (torch.bfloat16, torch.float32):
            gate.wg.to(dtype)  # in place: the wrapped router holds the same Parameter
            assert layer.router.weight.dtype == dtype
            with torch.no_grad():
                want = _hf_logits(gate, x_TD)
                got = layer.router(x_TD).logits_TE
            assert want.dtype == dtype and torch.equal(got, want.float())


def _tied_gate(gate: torch.nn.Module, D: int, k: int, a: int, b: int, eps: float) -> None:
    """Gate rows for the input x = e_0 + e_1: experts 0 .. k-2 far ahead, experts a and b both 2.4375 in bf16 (b's
    fp32 logit `eps` more), the rest far behind: the k-th pick is an exact bf16 tie."""
    w_ED = torch.zeros(gate_rows(gate), D)
    w_ED[:, 0] = -4.0
    w_ED[:k - 1, 0] = 6.0
    w_ED[a, 0] = w_ED[b, 0] = 2.4375
    w_ED[b, 1] = eps
    with torch.no_grad():
        next(p for p in gate.parameters() if p.dim() == 2).copy_(w_ED)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_an_exact_bf16_tie_picks_the_experts_transformers_picks(family, build):
    """Token 3 of Qwen3-MoE's first layer in issue bf16gate: two experts whose bf16 logits are equal. transformers
    breaks the tie by its top-k over equal probabilities; an fp32 gate sees the fp32 difference and picks the other
    expert, and the next layers drift beyond bf16 tolerance."""
    model = build(family).to(torch.bfloat16)
    moekit.hf.wrap(model)
    D = model.config.hidden_size
    layer, gate = moekit.hf.wrapped_blocks(model)[0], _hf_gates(model)[0]
    k = gate.top_k
    x_TD = torch.zeros(1, D, dtype=torch.bfloat16)
    x_TD[0, :2] = 1.0
    a, b = k - 1, k
    _tied_gate(gate, D, k, a, b, eps=0.0)
    with torch.no_grad():
        picks = set(gate(x_TD)[2][0].tolist())
    assert picks - set(range(k - 1)) in ({a}, {b})
    tie_pick = a if a in picks else b
    other = b if tie_pick == a else a
    # the expert transformers does not pick gets the larger fp32 logit (2**-9: below bf16's spacing 2**-6 at 2.4)
    _tied_gate(gate, D, k, tie_pick, other, eps=2.0**-9)
    with torch.no_grad():
        hf_logits, _, hf_idx = gate(x_TD)
        route = layer.router(x_TD)
        fp32_logits = torch.nn.functional.linear(x_TD.float(), layer.router.weight.float())
    assert hf_logits[0, a] == hf_logits[0, b]  # the exact tie in bf16
    assert fp32_logits[0, other] > fp32_logits[0, tie_pick]  # an fp32 gate would pick `other`
    assert sorted(route.expert_idx_N.tolist()) == sorted(hf_idx[0].tolist()) == [*range(k - 1), tie_pick]
