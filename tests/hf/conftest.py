"""Tiny randomly initialised transformers v5 MoE models (fp32, CPU) for the moekit.hf tests.

Every parameter is redrawn from a seeded generator with a std large enough that next-token logits
are well separated: transformers' init (std 0.02, and zeros for some routers) gives near-uniform
logits, where greedy decoding would hinge on rounding rather than on the routing rule.
"""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    DeepseekV3Config,
    MixtralConfig,
    OlmoeConfig,
    Qwen2MoeConfig,
    Qwen3MoeConfig,
)
from transformers.utils import logging

logging.set_verbosity_error()  # tiny configs trip harmless warnings (e.g. eos id outside the tiny vocab)

VOCAB = 128
_COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _configs() -> dict:
    return {
        "mixtral": MixtralConfig(**_COMMON, intermediate_size=64, num_local_experts=6, num_experts_per_tok=2),
        "olmoe": OlmoeConfig(**_COMMON, intermediate_size=48, num_experts=8, num_experts_per_tok=2,
                             norm_topk_prob=False),
        "qwen2_moe": Qwen2MoeConfig(**_COMMON, intermediate_size=96, moe_intermediate_size=32,
                                    shared_expert_intermediate_size=48, num_experts=8, num_experts_per_tok=2,
                                    norm_topk_prob=False),
        "qwen3_moe": Qwen3MoeConfig(**{**_COMMON, "num_hidden_layers": 3}, head_dim=16, intermediate_size=96,
                                    moe_intermediate_size=32, num_experts=8, num_experts_per_tok=3, norm_topk_prob=True,
                                    mlp_only_layers=[1]),
        # Dense first layer, sigmoid scores, e_score_correction_bias, 4 groups keep 2, scale 2.5, one shared expert.
        "deepseek_v3": DeepseekV3Config(**{**_COMMON, "num_hidden_layers": 3, "num_key_value_heads": 4},
                                        intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8,
                                        num_experts_per_tok=2, n_group=4, topk_group=2, n_shared_experts=1,
                                        routed_scaling_factor=2.5, norm_topk_prob=True, first_k_dense_replace=1,
                                        q_lora_rank=32, kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8,
                                        v_head_dim=16),
    }


FAMILIES = list(_configs())
# The HF block class each family's sparse layers use, and how many there are.
BLOCKS = {"mixtral": ("MixtralSparseMoeBlock", 2), "olmoe": ("OlmoeSparseMoeBlock", 2),
          "qwen2_moe": ("Qwen2MoeSparseMoeBlock", 2), "qwen3_moe": ("Qwen3MoeSparseMoeBlock", 2),
          "deepseek_v3": ("DeepseekV3MoE", 2)}


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p.shape[-1] if p.dim() > 1 else 1
                p.copy_(torch.randn(p.shape, generator=g) * (1.5 * fan_in**-0.5 if p.dim() > 1 else 0.1))
        for name, b in model.named_buffers():
            if name.rpartition(".")[2] in ("e_score_correction_bias", "expert_bias"):  # selection biases
                b.copy_(0.3 * torch.randn(b.shape, generator=g))
        for m in model.modules():  # a hash table (DeepSeek-V4; transformers': zeros): distinct experts per id
            table, gate = getattr(m, "tid2eid", None), getattr(m, "weight", None)
            if isinstance(table, torch.Tensor) and isinstance(gate, torch.Tensor):
                table.copy_(torch.rand(table.shape[0], gate.shape[0], generator=g).topk(table.shape[1], dim=-1).indices)
    return model


def _make_model(family: str, seed: int = 0, **overrides) -> torch.nn.Module:
    cfg = _configs()[family]
    for k, v in overrides.items():
        setattr(cfg, k, v)
    torch.manual_seed(seed)
    return randomize(AutoModelForCausalLM.from_config(cfg), seed).eval()


def _prompt(batch: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


# Test modules import nothing from here (--import-mode=importlib): the helpers come as fixtures.
@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture
def make_model():
    """make_model(family, seed=0, **config overrides) -> a tiny randomised model in eval mode."""
    return _make_model


@pytest.fixture
def randomized():
    """randomized(model, seed=0) -> the model with well separated random weights (see `randomize`)."""
    return randomize


@pytest.fixture
def prompt():
    """prompt(batch=2, length=12, seed=1) -> token ids (B, T)."""
    return _prompt


@pytest.fixture
def hf_blocks():
    """{family: (HF block class name, number of sparse blocks)}."""
    return BLOCKS


def _assert_keys_resolve(model, keys) -> None:
    """Every state_dict key names a Parameter or buffer of the (wrapped) model: transformers' loading and
    `model.get_parameter(key)` walk these paths."""
    for key in keys:
        owner, _, leaf = key.rpartition(".")
        value = getattr(model.get_submodule(owner), leaf)
        assert isinstance(value, torch.Tensor) and value is model.state_dict(keep_vars=True)[key], key


def _wrap_parity(model, cls_name: str, ids: torch.Tensor) -> list:
    """Wrap `model` (blocks of class `cls_name`) and check: logits to 1e-5 and 16 greedy tokens with the KV
    cache equal to unwrapped; the model's own tensors shared (no copies, each wrapped tensor one of its
    block's); state_dict keys unchanged and resolving; unwrap restores the very same modules. Returns the
    wrapped layers (the model is wrapped again at the end)."""
    import moekit.hf

    def blocks_of(m):
        return [b for b in m.modules() if type(b).__name__ == cls_name]

    with torch.no_grad():
        ref = model(ids).logits
        ref_gen = model.generate(ids, max_new_tokens=16, do_sample=False, min_new_tokens=16, pad_token_id=0)
    blocks = blocks_of(model)
    assert blocks
    hf_ptrs = {p.data_ptr() for p in model.parameters()}
    keys = list(model.state_dict())
    moekit.hf.wrap(model)
    layers = moekit.hf.wrapped_blocks(model)
    assert len(layers) == len(blocks)
    assert {p.data_ptr() for p in model.parameters()} == hf_ptrs  # no copies
    for block, wrapped in zip(blocks, layers, strict=True):
        theirs = {id(t) for t in block.state_dict(keep_vars=True).values()}
        assert all(id(t) in theirs for t in wrapped.state_dict(keep_vars=True).values())
    assert list(model.state_dict()) == keys
    _assert_keys_resolve(model, keys)
    _assert_names_match(model)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref, atol=1e-5, rtol=1e-5)
        gen = model.generate(ids, max_new_tokens=16, do_sample=False, min_new_tokens=16, pad_token_id=0)
    assert torch.equal(gen, ref_gen)
    moekit.hf.unwrap(model)
    assert blocks_of(model) == blocks
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)
    moekit.hf.wrap(model)
    return layers


def _assert_names_match(model: torch.nn.Module) -> None:
    """named_parameters() / named_buffers() spell every state_dict key (the HF names), at every root, each tensor
    once; named_modules() and remove_duplicate=False are torch's (moekit's module names, each tensor once)."""
    from moekit.hf import HFMoEBlock

    for root in [model, *(m for m in model.modules() if any(isinstance(c, HFMoEBlock) for c in m.children()))]:
        state = root.state_dict(keep_vars=True)
        keys = set(state)
        params, buffers = list(root.named_parameters()), list(root.named_buffers())
        named = {n for n, _ in params + buffers}
        tied = {k for k, t in state.items() if sum(u is t for u in state.values()) > 1}  # Gemma's lm_head: once
        assert named >= keys - tied, sorted(keys - tied - named)
        assert {n for n, _ in params} <= keys, sorted({n for n, _ in params} - keys)
        every = list(root.named_parameters(remove_duplicate=False))  # moekit's names: no tensor twice more than tied
        tied_params = [state[k] for k in tied if isinstance(state[k], torch.nn.Parameter)]
        assert len({id(p) for _, p in params}) == len(params) == len({id(p) for _, p in every})
        assert len(every) - len(params) == len(tied_params) - len({id(p) for p in tied_params})
        assert all(isinstance(m, torch.nn.Module) for _, m in root.named_modules())  # no name view leaks out
        by_name = dict(params + buffers)
        for key, t in state.items():
            assert key in tied or by_name[key] is t, key
        for name, p in params:  # what a name-built optimizer group or PEFT target list looks up
            assert root.get_parameter(name) is p, name
        for name, b in buffers:  # torch's get_buffer (MiniMax-M2's block-level selection bias included)
            assert name not in keys or root.get_buffer(name) is b, name


@pytest.fixture
def wrap_parity():
    """wrap_parity(model, block class name, ids) -> wrapped layers, after the checks of `_wrap_parity`."""
    return _wrap_parity


@pytest.fixture
def keys_resolve():
    """keys_resolve(model, keys): every state_dict key resolves to the model's own tensor."""
    return _assert_keys_resolve


@pytest.fixture
def names_match():
    """names_match(model): named_parameters() / named_buffers() spell the state_dict keys, at every root."""
    return _assert_names_match


@pytest.fixture
def build_causal():
    """build_causal(model_type, **config kwargs) -> a tiny randomised AutoModelForCausalLM in eval mode."""
    from transformers import AutoConfig

    def make(model_type: str, **kwargs) -> torch.nn.Module:
        torch.manual_seed(0)
        return randomize(AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **kwargs))).eval()

    return make


class _Logits(torch.nn.Module):
    """A causal LM as ids (B, T) -> logits, without the KV cache: what torch.export / torch.compile take."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.m = model

    def forward(self, ids):
        return self.m(input_ids=ids, use_cache=False).logits


@pytest.fixture
def logits_net():
    """logits_net(model) -> an nn.Module mapping ids (B, T) to the model's logits, use_cache=False."""
    return _Logits
