"""A wrapped model inside torch and transformers machinery (issue 14 item 4, "behave like the model you
wrapped"): every state_dict key set the way transformers' loader sets it, and torch.func.functional_call
with named_parameters / named_buffers dicts, give what the unwrapped model gives, on the families whose
HF names reach a tensor moekit holds under another name (DBRX's experts.mlp.w1, MiniMax-M2's and LFM2-MoE's
block-level selection bias, JetMoE's block bias, gpt-oss's expert biases)."""

from __future__ import annotations

import copy
import importlib.util
import pathlib

import pytest
import torch
from torch.func import functional_call
from transformers.modeling_utils import _load_parameter_into_model

import moekit.hf

_PATH = pathlib.Path(__file__).resolve().parents[2] / "scripts" / "hf_coverage.py"
_spec = importlib.util.spec_from_file_location("hf_coverage", _PATH)
cov = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cov)

# each family's tiny "aligned" config of scripts/hf_coverage.py; what in it is named otherwise by moekit
ALIASED = ["dbrx",  # experts.mlp.{w1,v1,w2}: the bank's gate_proj / up_proj / down_proj, one more path to them
           "minimax_m2", "lfm2_moe",  # the block's selection bias: moekit's router.e_score_correction_bias
           "jetmoe",  # the block's output bias: moekit's output_bias
           "gpt_oss",  # experts.gate_up_proj_bias: the bank's in_proj_bias
           "gemma4",  # the decoder layer's router.scale / experts.gate_up_proj: the inline layer's tensors
           "mixtral"]  # nothing: the control


def _pair(family: str):
    model = cov.build(family, "aligned")
    ref = copy.deepcopy(model)
    moekit.hf.wrap(model)
    return ref, model


def _ids() -> torch.Tensor:
    return torch.randint(3, cov.VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))


def _new_values(model: torch.nn.Module) -> dict:
    """Every state_dict entry redrawn (floating ones), as a checkpoint other than the model's would hold."""
    g = torch.Generator().manual_seed(7)
    return {k: (torch.randn(v.shape, generator=g) * v.float().std().clamp(min=0.1)).to(v.dtype)
            if v.is_floating_point() and v.numel() > 1 else v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("family", ALIASED)
def test_transformers_loader_sets_every_key_the_wrapped_model_then_uses(family):
    """transformers' loading sets each checkpoint key with get_submodule(owner) + setattr(leaf): on a wrapped
    model (wrapped at construction, then loaded) the value set must be the one the layer runs with."""
    ref, model = _pair(family)
    values = _new_values(ref)
    for key, value in values.items():
        _load_parameter_into_model(ref, key, value.clone())
        _load_parameter_into_model(model, key, value.clone())
    with torch.no_grad():
        torch.testing.assert_close(model(_ids()).logits, ref(_ids()).logits, atol=1e-5, rtol=1e-5)
    state = model.state_dict(keep_vars=True)
    assert list(state) == list(values)
    for key, t in state.items():  # each key once, the loaded value, a Parameter where unwrapped has one
        assert torch.equal(t, values[key]), key
        assert isinstance(t, torch.nn.Parameter) == isinstance(ref.state_dict(keep_vars=True)[key], torch.nn.Parameter)
    moekit.hf.unwrap(model)  # the original blocks get the loaded tensors
    with torch.no_grad():
        torch.testing.assert_close(model(_ids()).logits, ref(_ids()).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ALIASED)
def test_functional_call_with_named_parameters_and_buffers(family):
    """torch.func.functional_call with {name: tensor} from named_parameters() and named_buffers() (selection
    biases included) runs the wrapped model on those tensors, leaves it as it was, and gradients reach them."""
    ref, model = _pair(family)
    ids = _ids()
    with torch.no_grad():
        before = model(ids).logits
    values = {n: t.detach() * 1.1 + 0.05 for n, t in [*ref.named_parameters(), *ref.named_buffers()]
              if t.is_floating_point()}
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in ref.named_parameters()]
    with torch.no_grad():
        want = functional_call(ref, values, (ids,)).logits
        got = functional_call(model, values, (ids,)).logits
    # values * 1.1 + 0.05 grow the logits (up to ~6): with 2 BLAS threads the wrapped and unwrapped DBRX sum in
    # other orders (2e-5 apart, as they are loaded the same values by load_state_dict); a tensor the call
    # did not reach differs by > 1
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)  # every swapped tensor put back
    # gradients w.r.t. the passed tensors (what torch.func.grad and per-sample-gradient code rely on)
    params = {n: t.detach().clone().requires_grad_() for n, t in ref.named_parameters()}
    grads = []
    for m in (ref, model):
        loss = functional_call(m, params, (ids,)).logits.square().mean()
        grads.append(torch.autograd.grad(loss, list(params.values()), allow_unused=True))
    for name, a, b in zip(params, *grads, strict=True):
        assert (a is None) == (b is None), name
        if a is not None:
            # relative to the gradient's largest entry: two BLAS threads sum DBRX's norm-weight gradients in other
            # orders (2e-4 of the largest apart); a tensor the call did not reach gets None or another gradient
            torch.testing.assert_close(b, a, atol=1e-3 * float(a.abs().max()), rtol=0, msg=name)
    # torch.func.grad itself (its transform runs moekit's autograd.Functions' backward on its own tensor wrappers,
    # which have no storage: before, the grouped GEMM's kernel check read their data pointers and raised)
    plain = {n: t.detach() for n, t in params.items()}
    func_grads = torch.func.grad(lambda p: functional_call(model, p, (ids,)).logits.square().mean())(plain)
    for name, b in zip(params, grads[1], strict=True):
        want = torch.zeros_like(plain[name]) if b is None else b
        torch.testing.assert_close(func_grads[name], want, atol=1e-3 * float(want.abs().max()) + 1e-12, rtol=0,
                                   msg=name)  # DBRX: torch.func's and autograd's differ by 1.5e-4 of the
        # largest entry on transformers' own, unwrapped model too (one thread); the other families by < 1e-6


def _same_tensor_everywhere(model: torch.nn.Module, ref: torch.nn.Module) -> None:
    """Every state_dict key resolves with get_parameter / get_buffer / get_parameter_or_buffer to the state_dict's
    own tensor, and the wrapped model runs with it: a value written through get_buffer changes the logits as
    it does unwrapped."""
    state = model.state_dict(keep_vars=True)
    for key, t in state.items():
        get = model.get_parameter if isinstance(t, torch.nn.Parameter) else model.get_buffer
        assert get(key) is t and model.get_parameter_or_buffer(key) is t, key
    for key in [k for k in state if k.endswith(("e_score_correction_bias", "expert_bias"))]:
        bias = torch.randn(state[key].shape, generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            model.get_buffer(key).copy_(bias)
            ref.get_buffer(key).copy_(bias)
    with torch.no_grad():
        torch.testing.assert_close(model(_ids()).logits.float(), ref(_ids()).logits.float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["minimax_m2", "lfm2_moe", "deepseek_v3"])
def test_every_key_resolves_after_to_load_deepcopy_and_pickling(family, tmp_path):
    """The block's own selection bias (MiniMax-M2, LFM2-MoE; DeepSeek-V3's router-held one as the control) is
    a buffer of the block path for torch's get_buffer, and stays the one tensor moekit's router reads after
    `.to()`, load_state_dict (in place and assign=True), deepcopy and torch.save / torch.load of the module."""
    ref, model = _pair(family)
    ref.set_experts_implementation("eager")  # transformers' grouped_mm takes no float64
    keys = [k for k in ref.state_dict() if k.endswith(("e_score_correction_bias", "expert_bias"))]
    assert keys
    _same_tensor_everywhere(model, ref)
    for m in (ref, model):
        m.to(torch.float64)
    _same_tensor_everywhere(model, ref)
    for m in (ref, model):
        m.float()
    values = _new_values(ref)
    for assign in (False, True):
        for m in (ref, model):
            m.load_state_dict({k: v.clone() for k, v in values.items()}, strict=True, assign=assign)
        assert all(torch.equal(model.get_buffer(k), values[k]) for k in keys)
        _same_tensor_everywhere(model, ref)
    _same_tensor_everywhere(copy.deepcopy(model), copy.deepcopy(ref))
    torch.save(model, tmp_path / "wrapped.pt")
    _same_tensor_everywhere(torch.load(tmp_path / "wrapped.pt", weights_only=False), ref)
    # the buffer is seen once: named_buffers and state_dict spell it as transformers does
    assert [n for n, _ in model.named_buffers()] == [n for n, _ in ref.named_buffers()]
    assert list(model.state_dict()) == list(ref.state_dict())


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "minimax_m2", "gemma4"])
def test_names_without_deduplication_are_the_hf_names(family):
    """named_parameters / named_buffers(remove_duplicate=False) (what torch.func.functional_call(strict=True)
    checks keys against, and torch.export lifts) spell the same names as unwrapped, each tensor once."""
    ref, model = _pair(family)
    for kind in ("named_parameters", "named_buffers"):
        want = [n for n, _ in getattr(ref, kind)(remove_duplicate=False)]
        got = [n for n, _ in getattr(model, kind)(remove_duplicate=False)]
        assert sorted(got) == sorted(want), sorted(set(got) ^ set(want))
    scaled = {}  # one new tensor per tensor: tied names (Gemma's lm_head) get the same one
    values = {n: scaled.setdefault(id(t), t.detach() * 1.1) for n, t in ref.named_parameters(remove_duplicate=False)}
    values.update({n: t for n, t in ref.named_buffers(remove_duplicate=False)})
    with torch.no_grad():
        want = functional_call(ref, values, (_ids(),), strict=True).logits
        got = functional_call(model, values, (_ids(),), strict=True).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["minimax_m2", "dbrx"])
def test_aliased_families_export_and_compile(family, logits_net):
    """The live aliases (the block-held selection bias answered by the layer's `_buffers`, the bank's HF leaf
    names) leave torch.export (static and dynamic token counts) and torch.compile as they were, on the names
    torch lifts (the HF names)."""
    ref, model = _pair(family)
    net = logits_net(model).eval()  # (traced, the GEMMs take the masked all-rows path: fp32 sums in another order)
    ids, ids5 = _ids(), _ids()[:, :5]
    with torch.no_grad():
        want, want5 = logits_net(ref)(ids), logits_net(ref)(ids5)
        static = torch.export.export(net, (ids,), strict=False)
        assert set(static.state_dict) | set(static.constants) >= {f"m.{k}" for k in ref.state_dict()}
        torch.testing.assert_close(static.module()(ids), want, atol=1e-4, rtol=1e-4)
        dyn = torch.export.export(net, (ids,), dynamic_shapes={"ids": {1: torch.export.Dim("T", min=2, max=64)}},
                                  strict=False)
        torch.testing.assert_close(dyn.module()(ids5), want5, atol=1e-4, rtol=1e-4)
        torch._dynamo.reset()
        torch.testing.assert_close(torch.compile(net)(ids), want, atol=1e-4, rtol=1e-4)


def test_deleting_or_parametrizing_the_block_held_bias_names_the_router_s_and_changes_nothing():
    """register_parametrization (which deletes the name first) and `del` of MiniMax-M2's block-level HF name
    would take the selection bias from moekit's router: refused naming moekit's tensor, the model as it was;
    the router's own name parametrizes as it does on any module."""
    import torch.nn.utils.parametrize as parametrize

    from moekit.errors import UsageError

    ref, model = _pair("minimax_m2")
    layer = moekit.hf.wrapped_blocks(model)[0]
    with torch.no_grad():
        before = model(_ids()).logits
    with pytest.raises(UsageError, match=r"`e_score_correction_bias` .* moekit's `router.e_score_correction_bias`"):
        parametrize.register_parametrization(layer, "e_score_correction_bias", torch.nn.Identity())
    with pytest.raises(UsageError, match="router.e_score_correction_bias"):
        del layer.e_score_correction_bias
    assert type(layer) is moekit.hf.HFMoEBlock
    assert model.get_buffer("model.layers.0.mlp.e_score_correction_bias") is layer.router.e_score_correction_bias
    with torch.no_grad():
        assert torch.equal(model(_ids()).logits, before)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3", "llama4", "longcat_flash", "dbrx",
                                    "jetmoe", "gpt_oss"])
def test_trainer_weight_decay_groups_are_the_unwrapped_ones(family):
    """transformers' Trainer puts a parameter in its weight-decay group when `named_parameters()`' name is one
    `get_decay_parameter_names` builds from `named_children()` and `_parameters`: the wrapped model's router,
    shared experts and aliased stacks (`gate.weight`, `shared_expert.*`, `router.classifier.weight`,
    `experts.mlp.w1`, `input_linear.weight`) are decayed as unwrapped, not silently moved to no-decay."""
    from transformers import Trainer

    ref, model = _pair(family)

    def decayed(m) -> list[str]:
        names = set(Trainer.get_decay_parameter_names(None, m))
        return [n for n, _ in m.named_parameters() if n in names]

    assert decayed(model) == decayed(ref)
    assert any(".gate." in n or ".router." in n or "mlp.w1" in n for n in decayed(model))
    # the walk's answer is for that walk only: torch's module tree keeps moekit's names
    layer = moekit.hf.wrapped_blocks(model)[0]
    assert [n for n, _ in layer.named_children()] == list(layer._modules)
    assert all(isinstance(c, torch.nn.Module) for c in layer.children())


def test_trainer_weight_decay_walk_warns_where_inline_layers_miss_the_decay_group():
    # Before: Gemma 4's wrapped inline layers left their router and expert weights out of the Trainer's
    # weight-decay group silently (their HF names are leaves the walk reads from _parameters: no name tree).
    import warnings

    from transformers import Trainer

    ref, model = _pair("gemma4")
    names = set(Trainer.get_decay_parameter_names(None, ref))
    with pytest.warns(UserWarning, match="Trainer puts the router and expert weights of the wrapped .* no-decay"):
        got = set(Trainer.get_decay_parameter_names(None, model))
    assert any(n.endswith("experts.gate_up_proj") for n in names - got)  # what the warning is about
    mixtral = _pair("mixtral")[1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Trainer.get_decay_parameter_names(None, mixtral)
        list(moekit.hf.wrapped_blocks(model)[0].named_children())  # any other caller: no warning


def test_a_decode_step_reads_the_layer_s_children_without_the_forwarding_buffers(monkeypatch):
    # Before: every `self.router` / `self.experts` of a MiniMax-M2 / LFM2-MoE layer's forward went through torch's
    # __getattr__, which asks `_buffers` (the layer's _ForwardingBuffers: two Python calls per name) first.
    from moekit.hf.block import _ForwardingBuffers

    ref, model = _pair("minimax_m2")
    layers = moekit.hf.wrapped_blocks(model)
    assert all(type(layer._buffers) is _ForwardingBuffers for layer in layers)
    asked = []
    contains = _ForwardingBuffers.__contains__
    monkeypatch.setattr(_ForwardingBuffers, "__contains__", lambda self, key: asked.append(key) or contains(self, key))
    ids = _ids()[:1]
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
        asked.clear()
        step = model(input_ids=ids[:, -1:], past_key_values=out.past_key_values, use_cache=True).logits
        children = {name for layer in layers for name in layer._modules}
        assert not children & set(asked), sorted(children & set(asked))
        want = ref(input_ids=ids[:, -1:], past_key_values=ref(input_ids=ids, use_cache=True).past_key_values,
                   use_cache=True).logits
    torch.testing.assert_close(step, want, atol=1e-5, rtol=1e-5)
    assert model.get_buffer("model.layers.0.mlp.e_score_correction_bias") is layers[0].router.e_score_correction_bias
