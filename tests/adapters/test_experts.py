"""LoRA on fused MoE experts (moekit.adapters.experts): moekit MoE models and transformers MoE models wrapped
by moekit.hf.wrap, per-expert and shared adapters."""

from __future__ import annotations

import json

import pytest
import torch

import moekit
import moekit.adapters as ad
from moekit.adapters.experts import ExpertLoRA
from moekit.adapters.reference import expert_lora_reference
from moekit.dispatch import make_plan, permute
from moekit.errors import UsageError
from moekit.ops import grouped

from .conftest import logits, randomize_adapters

BOTH = ["experts.gate_up_proj", "experts.down_proj"]
MODES = ["per_expert", "shared"]


def moekit_moe(router=None, seed: int = 0, activation: str = "swiglu"):
    """A tiny moekit MoE LM: 2 layers, both MoE (E 4, d 32)."""
    from moekit.models import LMConfig, MoELM

    torch.manual_seed(seed)
    moe = moekit.MoEConfig(d_model=32, d_expert=32, num_experts=4, activation=activation,
                           router=router or moekit.RouterConfig(kind="topk", k=2))
    return MoELM(LMConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=64, moe=moe)).eval()


def hf_moe(family: str, seed: int = 0):
    """A tiny random transformers MoE model (mixtral: 6 experts, qwen2_moe: 8 and a shared expert), wrapped."""
    from transformers import AutoModelForCausalLM, MixtralConfig, Qwen2MoeConfig

    common = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg = {"mixtral": lambda: MixtralConfig(**common, intermediate_size=32, num_local_experts=6, num_experts_per_tok=2),
           "qwen2_moe": lambda: Qwen2MoeConfig(**common, intermediate_size=48, moe_intermediate_size=32,
                                               shared_expert_intermediate_size=48, num_experts=8,
                                               num_experts_per_tok=2, norm_topk_prob=False)}[family]()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # transformers' std-0.02 init gives near-uniform routing; spread it out
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
    return moekit.hf.wrap(model)


MODELS = {"moekit": moekit_moe, "moekit_topp": lambda: moekit_moe(moekit.RouterConfig(kind="topp", p=0.5)),
          "mixtral": lambda: hf_moe("mixtral"), "qwen2_moe": lambda: hf_moe("qwen2_moe")}
EXPERTS = {"moekit": 8, "moekit_topp": 8, "mixtral": 12, "qwen2_moe": 16}  # experts over both layers


def randomize(model):
    randomize_adapters(model, scale=0.3)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(MODELS))
def test_zero_B_equals_base_and_merge_unmerge_is_exact(name, mode, ids):
    model = MODELS[name]()
    base = logits(model, ids)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    summary = ad.add_adapters(model, ad.LoRAConfig(r=4, lora_alpha=8, target_modules=[], target_parameters=BOTH,
                                                   expert_adapter=mode))
    assert str(summary).startswith(f"lora(r=4, lora_alpha=8, experts={mode}): LoRA on {EXPERTS[name]} of "
                                   f"{EXPERTS[name]} experts in 2 layers (gate_up_proj, down_proj); trainable")
    assert torch.equal(logits(model, ids), base)  # B = 0: the base model exactly
    randomize(model)
    adapted = logits(model, ids)
    assert (adapted - base).abs().max() > 1e-2
    ad.merge(model)
    assert torch.allclose(logits(model, ids), adapted, rtol=1e-4, atol=1e-4)
    ad.unmerge(model)
    assert torch.equal(logits(model, ids), adapted)
    ad.remove_adapters(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # every base weight bit for bit
    assert torch.equal(logits(model, ids), base)


ROUTERS = {"topk": moekit.RouterConfig(kind="topk", k=2),
           "topp": moekit.RouterConfig(kind="topp", p=0.4),  # dynamic k: 1..E experts per token
           "null": moekit.RouterConfig(kind="null", k=2, n_null=2)}  # some tokens reach no expert


@pytest.mark.parametrize("path", ["kernel", "loop"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("router", list(ROUTERS))
def test_grouped_path_equals_per_expert_loop(router, mode, path):
    """The bank's forward on the routed rows of a real route against the per-expert formula (float64),
    forward and backward; the grouped GEMMs ran the requested path."""
    model = moekit_moe(ROUTERS[router])
    ad.add_adapters(model, ad.LoRAConfig(r=4, lora_alpha=8, target_modules=[], target_parameters=BOTH,
                                         expert_adapter=mode))
    randomize(model)
    layer = model.layers[0].ffn
    bank = layer.experts
    x_TD = torch.randn(40, 32, generator=torch.Generator().manual_seed(3))
    route = layer.router(x_TD)
    plan = make_plan(route.token_idx_N, route.expert_idx_N, route.weight_N, 4)
    x_ND = permute(x_TD, plan).requires_grad_()
    with grouped.force(path) as ran:
        y = bank(x_ND, plan.offsets_E)
    # base in, base out, and for per-expert adapters A then B on both weights; shared pairs run F.linear
    assert ran["forward", path] == (6 if mode == "per_expert" else 2)
    A64 = {k: v.detach().double().requires_grad_() for k, v in bank.lora_A.items()}
    B64 = {k: v.detach().double().requires_grad_() for k, v in bank.lora_B.items()}
    x64 = x_ND.detach().double().requires_grad_()
    ref = expert_lora_reference(x64, plan.offsets_E, bank.base_layer, A64, B64, bank.scaling)
    assert torch.allclose(y.double(), ref, rtol=1e-4, atol=1e-4)
    upstream = torch.randn_like(ref)
    with grouped.force(path) as ran:
        (y * upstream.float()).sum().backward()
    assert ran["dx", path] == (6 if mode == "per_expert" else 2)
    assert ran["dw", path] == (4 if mode == "per_expert" else 0)  # the frozen base weights get no gradient
    (ref * upstream).sum().backward()
    assert torch.allclose(x_ND.grad.double(), x64.grad, rtol=1e-3, atol=1e-3)
    for k in bank.targets:
        assert torch.allclose(bank.lora_A[k].grad.double(), A64[k].grad, rtol=1e-3, atol=1e-3)
        assert torch.allclose(bank.lora_B[k].grad.double(), B64[k].grad, rtol=1e-3, atol=1e-3)
    assert bank.base_layer.gate_up_proj.grad is None and bank.base_layer.down_proj.grad is None


def test_gelu_bank_and_one_weight():
    """A GELU bank (up_proj) with only its input weight adapted equals the loop; down_proj is untouched."""
    model = moekit_moe(activation="gelu")
    ad.add_adapters(model, ad.LoRAConfig(r=4, target_modules=[], target_parameters=["experts.up_proj"]))
    randomize(model)
    bank = model.layers[1].ffn.experts
    assert bank.targets == ("up_proj",)
    x_ND = torch.randn(12, 32)
    offsets_E = torch.tensor([3, 3, 9, 12], dtype=torch.int32)
    with grouped.record() as ran:
        y = bank(x_ND, offsets_E)
    assert ran["forward", "kernel"] + ran["forward", "loop"] + ran["forward", "loop_wx"] == 4
    ref = expert_lora_reference(x_ND.double(), offsets_E, bank.base_layer, {k: v.double() for k, v in bank.lora_A.items()},
                                {k: v.double() for k, v in bank.lora_B.items()}, bank.scaling)
    assert torch.allclose(y.double(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["mixtral", "moekit_topp"])
def test_training_updates_only_the_adapters(name, ids):
    model = MODELS[name]()
    ad.add_adapters(model, ad.LoRAConfig(r=4, target_modules=[], target_parameters=BOTH))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(3):
        out = logits(model, ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert all(not torch.equal(p, adapters[n]) for n, p in model.named_parameters() if ".lora_B." in n)


def test_summary_counts_the_adapted_experts():
    model = hf_moe("mixtral")
    summary = ad.add_adapters(model, ad.LoRAConfig(r=2, target_modules=["q_proj"],
                                                   target_parameters=["model.layers.1.mlp.experts.down_proj"]))
    assert "LoRA on 6 of 12 experts in 1 layers (down_proj)" in str(summary)
    assert (summary.experts_adapted, summary.experts_total, summary.expert_layers) == (6, 12, 1)
    assert "on 3 modules (experts x1, q_proj x2) in 2 layers" in str(summary)
    assert isinstance(model.model.layers[1].mlp.experts, ExpertLoRA)
    assert not isinstance(model.model.layers[0].mlp.experts, ExpertLoRA)


def test_refuses_targets_that_do_not_exist():
    model = moekit_moe()
    with pytest.raises(UsageError, match=r"'experts.up_proj' matches no parameter of MoELM; its expert banks' weights "
                                         r"are experts.gate_up_proj, experts.down_proj"):
        ad.add_adapters(model, ad.LoRAConfig(target_modules=[], target_parameters=["experts.up_proj"]))
    with pytest.raises(UsageError, match=r"'layers.7.ffn.experts.down_proj' matches no parameter"):
        ad.add_adapters(model, ad.LoRAConfig(target_modules=[], target_parameters=["layers.7.ffn.experts.down_proj"]))
    with pytest.raises(UsageError, match=r"layers.0.attn.q_proj.weight is a parameter of layers.0.attn.q_proj \(Linear\), "
                                         r"not a stacked weight of a moekit ExpertBank"):
        ad.add_adapters(model, ad.LoRAConfig(target_modules=[], target_parameters=["q_proj.weight"]))
    with pytest.raises(UsageError, match=r"layers.0.ffn.experts is a moekit ExpertBank .*target_parameters="):
        ad.add_adapters(model, ad.LoRAConfig(target_modules=["experts"]))
    with pytest.raises(UsageError, match=r"lora_dropout=0.1 is invalid; allowed: 0 when target_parameters is set"):
        ad.add_adapters(model, ad.LoRAConfig(lora_dropout=0.1, target_modules=[], target_parameters=BOTH))
    with pytest.raises(UsageError, match=r"expert_adapter='each' is invalid"):
        ad.add_adapters(model, ad.LoRAConfig(target_modules=[], target_parameters=BOTH, expert_adapter="each"))
    assert not ad.adapter_layers(model) and all(p.requires_grad for p in model.parameters())  # left as it came


def test_unwrapped_transformers_experts_are_named():
    model = hf_moe("mixtral")
    moekit.hf.unwrap(model)
    with pytest.raises(UsageError, match=r"model.layers.0.mlp.experts.gate_up_proj is a parameter of "
                                         r"model.layers.0.mlp.experts \(MixtralExperts\).*moekit.hf.wrap\(model\) first"):
        ad.add_adapters(model, ad.LoRAConfig(target_modules=[], target_parameters=BOTH))


@pytest.mark.parametrize("mode", MODES)
def test_save_load_round_trip_in_peft_layout(mode, tmp_path, ids):
    model = hf_moe("qwen2_moe")
    cfg = ad.LoRAConfig(r=2, lora_alpha=4, target_modules=["q_proj"], target_parameters=BOTH, expert_adapter=mode)
    ad.add_adapters(model, cfg)
    randomize(model)
    expected = logits(model, ids)
    ad.save_adapters(model, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["target_parameters"] == BOTH and config["target_modules"] == ["q_proj"]
    assert ("peft_type" in config) == (mode == "per_expert")  # PEFT has no adapter shared by all experts
    state = ad.read_adapter_state(tmp_path / "a")
    bank = model.model.layers[0].mlp.experts
    key = "base_model.model.model.layers.0.mlp.experts."
    E, r = 8, 2
    if mode == "per_expert":
        # PEFT's ParamWrapper: down_proj (registered last) outermost; A (E*r, I), B (O, r*E);
        # PEFT's delta: einsum("o r e, e r i -> e o i") * scaling
        assert state[key + "lora_A.weight"].shape == (E * r, 32) and state[key + "lora_B.weight"].shape == (32, r * E)
        assert state[key + "base_layer.lora_A.weight"].shape == (E * r, 32)
        for prefix, weight in (("", "down_proj"), ("base_layer.", "gate_up_proj")):
            A, B = state[key + prefix + "lora_A.weight"], state[key + prefix + "lora_B.weight"]
            peft_delta = torch.einsum("ore,eri->eoi", B.reshape(B.shape[0], r, E), A.reshape(E, r, -1)) * 2.0
            assert torch.allclose(peft_delta, bank.delta_weight(weight).detach(), atol=1e-6)
    else:
        assert state[key + "lora_A.weight"].shape == (r, 32) and state[key + "lora_B.weight"].shape == (32, r)
    fresh = hf_moe("qwen2_moe")
    ad.load_adapters(fresh, tmp_path / "a")
    assert torch.equal(logits(fresh, ids), expected)


def test_only_routed_rows_reach_the_adapters(monkeypatch):
    """Every adapter GEMM sees the N routed rows (a top-p route: a varying number per token), never T x E."""
    from moekit.adapters import experts

    model = moekit_moe(moekit.RouterConfig(kind="topp", p=0.4))
    ad.add_adapters(model, ad.LoRAConfig(r=4, target_modules=[], target_parameters=BOTH))
    layer = model.layers[0].ffn
    rows = []
    real = experts.grouped_linear

    def spy(x_NI, w, offsets):
        rows.append(x_NI.shape[0])
        return real(x_NI, w, offsets)

    monkeypatch.setattr(experts, "grouped_linear", spy)
    x_TD = torch.randn(30, 32)
    with torch.no_grad():
        layer(x_TD)
    N = layer.routing_info().route.num_assignments
    assert len(rows) == 6 and set(rows) == {N}
    assert N != 30 and N < 30 * 4  # dynamic k: not one expert per token, not every expert


def test_merge_and_unload_then_unwrap_gives_the_adapted_transformers_model(ids):
    model = hf_moe("mixtral")
    ad.add_adapters(model, ad.LoRAConfig(r=4, target_modules=[], target_parameters=BOTH))
    randomize(model)
    adapted = logits(model, ids)
    ad.merge_and_unload(model)
    moekit.hf.unwrap(model)
    assert type(model.model.layers[0].mlp).__name__ == "MixtralSparseMoeBlock"
    assert torch.allclose(logits(model, ids), adapted, rtol=1e-4, atol=1e-4)


def test_bf16_bank_merge_unmerge_is_exact(ids):
    model = moekit_moe().to(torch.bfloat16)
    ad.add_adapters(model, ad.LoRAConfig(r=4, target_modules=[], target_parameters=BOTH))
    randomize(model)
    bank = model.layers[0].ffn.experts
    assert bank.lora_A["down_proj"].dtype == torch.float32  # adapters in fp32 over a bf16 bank
    adapted = logits(model, ids)
    assert adapted.dtype == torch.bfloat16
    before = [w.clone() for w in bank.base_weights()]
    ad.merge(model)
    assert torch.allclose(logits(model, ids).float(), adapted.float(), atol=0.1)
    ad.unmerge(model)
    assert all(torch.equal(w, b) for w, b in zip(bank.base_weights(), before, strict=True))


def test_unwrap_with_adapters_is_refused():
    model = hf_moe("mixtral")
    ad.add_adapters(model, ad.LoRAConfig(r=4, target_modules=[], target_parameters=["layers.1.mlp.experts.down_proj"]))
    with pytest.raises(UsageError, match=r"experts of this MixtralSparseMoeBlock are wrapped by a ExpertLoRA; call "
                                         r"moekit.adapters.remove_adapters\(model\)"):
        moekit.hf.unwrap(model)
    assert type(model.model.layers[0].mlp).__name__ == "HFMoEBlock"  # nothing was unwrapped
    ad.remove_adapters(model)
    moekit.hf.unwrap(model)
    assert type(model.model.layers[1].mlp).__name__ == "MixtralSparseMoeBlock"


def test_libraries_refuse_expert_loras():
    model = moekit_moe()
    cfg = ad.LoRAConfig(r=2, target_modules=[], target_parameters=BOTH)
    ad.add_adapters(model, cfg)
    lora = (cfg, ad.adapter_state_dict(model))
    with pytest.raises(UsageError, match=r"LoRA 0 adapts stacked expert weights \(experts.gate_up_proj, "
                                         r"experts.down_proj\); libraries hold LoRAs on linear layers"):
        ad.merge_loras([lora, lora])


def test_zero_B_equals_base_at_few_rows_per_expert_with_a_wide_hidden_layer(monkeypatch):
    """B = 0 gives the base model exactly at decode sizes too, where the hidden activations reach
    grouped.CPU_PER_EXPERT_BYTES per expert (2F >= 32768 at 4 rows per expert; here the size rules are lowered to
    the tiny experts): the base bank runs the grouped GEMMs ("loop_wx") as the adapter layer does, not one F.linear
    FFN per expert."""
    monkeypatch.setattr(grouped, "CPU_WX_MIN_WEIGHT_BYTES", 0)
    monkeypatch.setattr(grouped, "CPU_PER_EXPERT_BYTES", 1)
    model = moekit_moe()
    ids = torch.randint(3, 64, (1, 3), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():  # inference: the bank's per-expert route is on the table
        base = logits(model, ids)
        ad.add_adapters(model, ad.LoRAConfig(r=4, lora_alpha=8, target_modules=[], target_parameters=BOTH))
        with grouped.record() as ran:
            assert torch.equal(logits(model, ids), base)
    assert ran["forward", "loop_wx"] > 0
