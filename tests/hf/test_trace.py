"""Wrapped models trace like unwrapped ones: no host synchronisation in the forward, torch.export with
static and dynamic token counts, torch.compile(fullgraph=True) (issue 14 item 4)."""

from __future__ import annotations

import collections

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import moekit.hf
from moekit.ops import grouped

# Ops whose result the host must read (a device->host sync on a GPU): scalars, and outputs sized by data.
SYNC_OPS = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.bincount.default",
            "aten.masked_select.default", "aten.repeat_interleave.Tensor", "aten._unique2.default",
            "aten.unique_consecutive.default"}


class HostSyncs(TorchDispatchMode):
    """Counts ops that read tensor data on the host: item/bool/int/float, nonzero, bincount, boolean
    indexing, ...; `tolist` does not dispatch, so a function mode (`_ToList`) counts it."""

    def __init__(self):
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        bool_index = name.startswith("aten.index") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool
            for a in args if isinstance(a, (list, tuple)) for i in a)
        if name in SYNC_OPS or bool_index:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


class _ToList(TorchFunctionMode):
    def __init__(self, counter: collections.Counter):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") == "tolist":
            self.counter["tolist"] += 1
        return func(*args, **(kwargs or {}))


def test_the_sync_counter_sees_each_kind_of_sync():
    """The counter below would see a sync: each kind the routers once had is counted."""
    x = torch.tensor([0, 2, 3])
    for op in (lambda: bool(x.any()), lambda: x.nonzero(), lambda: x.tolist(), lambda: x[x > 1],
               lambda: torch.bincount(x), lambda: int(x.sum())):
        syncs = HostSyncs()
        with _ToList(syncs.ops), syncs:
            op()
        assert sum(syncs.ops.values()) == 1, syncs.ops


@pytest.mark.parametrize("training", [False, True])
def test_wrapped_forward_has_no_host_sync(family, training, make_model, prompt):
    """Inference, and a training forward with transformers' aux loss: no op reads data on the host. The
    kernel is forced, as a GPU runs it (the CPU's per-expert loop for few rows reads the counts)."""
    model = make_model(family)
    ids = prompt()
    moekit.hf.wrap(model)
    model.train(training)
    syncs = HostSyncs()
    with torch.set_grad_enabled(training), grouped.force("kernel") as ran, _ToList(syncs.ops), syncs:
        out = model(ids, labels=ids, output_router_logits=True)
    assert ran["forward", "kernel"] > 0
    assert out.loss.requires_grad == training
    assert not syncs.ops, f"host syncs in the wrapped forward: {dict(syncs.ops)}"


def test_wrapped_inference_path_has_no_host_sync(family, make_model, prompt):
    """The layers' inference path (no grad, no router-logit recording) reads no data on the host either."""
    model = make_model(family)
    ids = prompt()
    moekit.hf.wrap(model)
    ran = []
    for layer in moekit.hf.wrapped_blocks(model):
        inference_forward = layer._inference_forward
        layer._inference_forward = lambda x_TD, f=inference_forward: ran.append(1) or f(x_TD)
    syncs = HostSyncs()
    with torch.no_grad(), grouped.force("kernel") as kernel, _ToList(syncs.ops), syncs:
        model(ids)
    assert ran and kernel["forward", "kernel"] > 0
    assert not syncs.ops, f"host syncs in the wrapped forward: {dict(syncs.ops)}"


def test_wrapped_block_exports_with_a_dynamic_token_count(family, make_model):
    """torch.export of a wrapped block (fp32: the traced graph takes the "masked" expert path), with the
    token count dynamic; the exported program matches eager at another length, gradients included."""
    model = make_model(family)
    moekit.hf.wrap(model)
    block = moekit.hf.wrapped_blocks(model)[0]
    x = torch.randn(2, 12, block.cfg.d_model)
    T = torch.export.Dim("T", min=2, max=64)
    program = torch.export.export(block, (x,), dynamic_shapes={"hidden_states": {1: T}}, strict=False)
    assert "_local_scalar_dense" not in str(program.graph)  # no host read in the graph
    x7 = torch.randn(2, 7, block.cfg.d_model)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x7), block(x7), atol=1e-5, rtol=1e-5)


# The blocks that return a tuple (gpt-oss: the chosen weights (T, K); Llama 4: the router logits), tiny.
TUPLE_BLOCKS = {
    "gpt_oss": dict(intermediate_size=48, num_local_experts=6, num_experts_per_tok=2,
                    layer_types=["full_attention", "sliding_attention"], sliding_window=16),
    "llama4_text": dict(intermediate_size=48, intermediate_size_mlp=64, num_local_experts=6, num_experts_per_tok=1,
                        interleave_moe_layer_step=1, no_rope_layers=[1, 1], attention_chunk_size=64),
}


@pytest.mark.parametrize("fam", list(TUPLE_BLOCKS))
def test_tuple_returning_blocks_trace_without_host_sync(fam, build_causal, prompt):
    """gpt-oss and Llama 4: the wrapped forward (inference and training, kernel forced) reads no data on the
    host (gpt-oss's (T, K) weights used to read K_max), and the block exports with a dynamic token count."""
    model = build_causal(fam, vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1,
                         eos_token_id=2, head_dim=8, **TUPLE_BLOCKS[fam])
    moekit.hf.wrap(model)
    ids = prompt()
    for training in (False, True):
        model.train(training)
        syncs = HostSyncs()
        with torch.set_grad_enabled(training), grouped.force("kernel") as ran, _ToList(syncs.ops), syncs:
            model(ids, labels=ids)
        assert ran["forward", "kernel"] > 0
        assert not syncs.ops, f"host syncs in the wrapped {fam} forward: {dict(syncs.ops)}"
    model.eval()
    block = moekit.hf.wrapped_blocks(model)[0]
    x = torch.randn(2, 12, block.cfg.d_model)
    program = torch.export.export(block, (x,), dynamic_shapes={"hidden_states": {1: torch.export.Dim("T", min=2,
                                                                                                   max=64)}},
                                  strict=False)
    assert "_local_scalar_dense" not in str(program.graph)
    x7 = torch.randn(2, 7, block.cfg.d_model)
    with torch.no_grad():
        for got, want in zip(program.module()(x7), block(x7), strict=True):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("fam", ["mixtral", "deepseek_v3"])
def test_wrapped_model_exports_and_compiles_like_transformers(fam, make_model, prompt, logits_net):
    model = make_model(fam)
    moekit.hf.wrap(model)
    net = logits_net(model).eval()
    ids, ids7 = prompt(), prompt(2, 7)
    with torch.no_grad():
        want, want7 = net(ids), net(ids7)
        static = torch.export.export(net, (ids,), strict=False)
        torch.testing.assert_close(static.module()(ids), want, atol=1e-5, rtol=1e-5)
        dyn = torch.export.export(net, (ids,), dynamic_shapes={"ids": {1: torch.export.Dim("T", min=2, max=64)}},
                                  strict=False)
        torch.testing.assert_close(dyn.module()(ids7), want7, atol=1e-5, rtol=1e-5)
        torch._dynamo.reset()
        torch.testing.assert_close(torch.compile(net, fullgraph=True)(ids), want, atol=1e-5, rtol=1e-5)


def test_a_compiled_forward_leaves_read_only_aux_losses():
    """Inside torch.compile the routing info keeps plain dicts (dynamo cannot rebuild the read-only mapping
    that leaves the graph); `routing_info()` hands them out read-only all the same."""
    import moekit

    layer = moekit.MoELayer(moekit.MoEConfig(d_model=16, d_expert=8, num_experts=4, router=moekit.RouterConfig(k=2)))
    layer.train()
    torch.compile(layer, backend="eager", fullgraph=True)(torch.randn(2, 5, 16))
    info = layer.routing_info()
    assert "load_balance" in info.aux  # the layer's aux losses (the top-k router adds none of its own)
    for aux in (info.aux, info.route.aux):
        assert isinstance(aux, moekit.routers.base.FrozenAux)
        with pytest.raises(TypeError):
            aux["load_balance"] = torch.zeros(())
