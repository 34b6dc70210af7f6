"""TraceRecorder records exactly what MoELayer.routing_info() reports: ids and weights of the
executed assignments (after capacity dropping), padding excluded, for top-k and dynamic routers;
its look-ahead predictions are moekit.routers.predict's, also for null-expert routers."""

import numpy as np
import pytest
import torch
from torch import nn

import moekit
from moekit.analysis import RoutingTrace, TraceRecorder, corpus_batches, expert_counts, record_trace
from moekit.analysis.report import AnalysisConfig, compute_metrics
from moekit.routers.predict import predict_route


class Stack(nn.Module):
    """A residual stack of MoELayers: the smallest module that contains several of them."""

    def __init__(self, routers: list[dict], d_model: int = 32, E: int = 4, **moe):
        super().__init__()
        self.layers = nn.ModuleList([
            moekit.MoELayer(moekit.MoEConfig(d_model=d_model, d_expert=64, num_experts=E,
                                             router=moekit.RouterConfig(**r), **moe)) for r in routers])

    def forward(self, x, padding_mask=None):
        for layer in self.layers:
            x = x + layer(x, padding_mask)
        return x


ROUTERS = {
    "topk": [{"kind": "topk", "k": 2}] * 3,
    "topp": [{"kind": "topp", "p": 0.5}, {"kind": "topk", "k": 2}, {"kind": "topp", "p": 0.3}],
    "null": [{"kind": "null", "n_null": 4, "k": 2}] * 2,
    "expert_choice": [{"kind": "expert_choice"}] * 2,
}


def reference_routing(model: Stack):
    """Hooks that keep each layer's routing_info() as padded (B*T, K) numpy arrays, independently of the recorder."""
    seen = {}

    def hook(i):
        def fn(module, args, output):
            ids, w = module.routing_info().executed.to_padded()
            seen[i] = (ids.numpy(), w.numpy())
        return fn

    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(model.layers)]
    return seen, handles


@pytest.mark.parametrize("kind", sorted(ROUTERS))
def test_recorder_matches_routing_info(kind):
    torch.manual_seed(0)
    model = Stack(ROUTERS[kind]).eval()
    B, T = 3, 9
    x = torch.randn(B, T, 32)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 6:] = False  # right padding
    mask[2, :2] = False  # left padding
    seen, handles = reference_routing(model)
    with torch.no_grad(), TraceRecorder(model, gate_lookahead=0) as rec:
        rec.begin_batch(["code", "math", "code"], mask)
        model(x)
    for h in handles:
        h.remove()
    trace = rec.to_trace()
    assert trace.domains == ["code", "math", "code"]
    assert len(trace.seqs) == B and trace.num_layers == len(model.layers)
    assert trace.layer_names == ["layers.0", "layers.1", "layers.2"][:len(model.layers)]
    for b in range(B):
        valid = mask[b].numpy()
        assert trace.seqs[b].shape[1] == valid.sum()
        for layer, (ids_TK, w_TK) in seen.items():
            ids_btk = ids_TK.reshape(B, T, -1)[b][valid]
            w_btk = w_TK.reshape(B, T, -1)[b][valid]
            K = ids_btk.shape[1]
            got_ids, got_w = trace.seqs[b][layer], trace.weights[b][layer]
            np.testing.assert_array_equal(got_ids[:, :K], ids_btk)
            np.testing.assert_array_equal(got_ids[:, K:], -1)  # padded to the sequence's K_max
            np.testing.assert_array_equal(got_w[:, :K], w_btk.astype(np.float32))
            np.testing.assert_array_equal(got_w[:, K:], 0)
    k_T = (trace.seqs[0] >= 0).sum(axis=2)
    if kind in ("topp", "expert_choice"):
        assert len(np.unique(k_T)) > 1, "a dynamic router should use varying experts per token"


def test_layer_padding_mask_is_used_without_begin_batch_mask():
    model = Stack(ROUTERS["topk"]).eval()
    x = torch.randn(2, 5, 32)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    with torch.no_grad(), TraceRecorder(model, gate_lookahead=0) as rec:
        rec.begin_batch(["a", "b"])
        model(x, mask)  # the layers receive the mask; the recorder reads it from their arguments
    trace = rec.to_trace()
    assert [s.shape[1] for s in trace.seqs] == [3, 5]


@pytest.mark.parametrize("routers", [[{"kind": "topk", "k": 2}] * 4,
                                     [{"kind": "null", "n_null": 4, "k": 3}] * 4,
                                     [{"kind": "topp", "p": 0.6}, {"kind": "null", "n_null": 2, "k": 2},
                                      {"kind": "topp", "p": 0.3}, {"kind": "topk", "k": 1}]],
                         ids=["topk", "null", "mixed"])
def test_gate_lookahead_predictions(routers):
    """Layer l's prediction from layer (l-d)'s input is layer l's router's own choice on that input."""
    torch.manual_seed(1)
    model = Stack(routers).eval()
    x = torch.randn(2, 6, 32)
    inputs = {}
    handles = [layer.register_forward_hook(lambda m, a, o, i=i: inputs.__setitem__(i, a[0].reshape(-1, 32)))
               for i, layer in enumerate(model.layers)]
    with torch.no_grad(), TraceRecorder(model, gate_lookahead=2) as rec:
        rec.begin_batch(["a", "b"])
        model(x)
    for h in handles:
        h.remove()
    trace = rec.to_trace()
    assert sorted(trace.prefetch) == [1, 2]
    for d in (1, 2):
        for layer in range(4):
            pred = np.concatenate([p[layer] for p in trace.prefetch[d]])
            if layer < d:
                assert np.all(pred == -1)
                continue
            with torch.no_grad():
                choice = model.layers[layer].router(inputs[layer - d])
            expected = [set() for _ in range(12)]
            for t, e in zip(choice.token_idx_N.tolist(), choice.expert_idx_N.tolist(), strict=True):
                expected[t].add(e)
            assert [{e for e in row if e >= 0} for row in pred.tolist()] == expected
            assert pred.max() < 4  # null experts never appear


def test_implicit_batches_and_errors():
    model = Stack(ROUTERS["topk"]).eval()
    x = torch.randn(2, 4, 32)
    with torch.no_grad(), TraceRecorder(model) as rec:
        model(x)
        model(x[:1])  # a new forward without begin_batch: a new unlabelled batch
    trace = rec.to_trace()
    assert len(trace.seqs) == 3 and trace.domains is None
    np.testing.assert_array_equal(trace.seqs[0], trace.seqs[2])

    with torch.no_grad(), TraceRecorder(model) as rec:
        rec.begin_batch(["a", "b"])
        model(x)
        with pytest.raises(RuntimeError, match="ran twice in one batch"):
            model(x)
    with torch.no_grad(), TraceRecorder(model) as rec:
        rec.begin_batch(["a"])  # one label, two sequences
        model(x)
        with pytest.raises(ValueError, match="1 domain labels for a batch of 2"):
            rec.end_batch()
    with torch.no_grad(), TraceRecorder(model) as rec:
        rec.begin_batch(["a", "b"])
        model.layers[0](x)  # the other layers never run
        with pytest.raises(RuntimeError, match=r"layers \[1, 2\] did not run"):
            rec.end_batch()
    with pytest.raises(ValueError, match="contains no moekit MoELayer"):
        TraceRecorder(nn.Linear(2, 2))
    with TraceRecorder(model) as rec, pytest.raises(RuntimeError, match="nothing recorded"):
        rec.to_trace()


def test_record_trace_restores_training_mode_and_labels_corpus_batches():
    from moekit.data import ByteTokenizer, Sample

    samples = [Sample(text="def f(x):\n    return x", domain="python", index=0),
               Sample(text="Guten Tag", domain="german", index=1),
               Sample(text="ok", domain="english", index=2)]

    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(ByteTokenizer.vocab_size, 32)
            self.body = Stack(ROUTERS["topp"])

        def forward(self, ids):
            return self.body(self.embed(ids))

    model = LM().train()
    trace = record_trace(model, corpus_batches(samples, ByteTokenizer(), seq_len=12, batch_size=2))
    assert model.training and all(m.training for m in model.modules())
    assert isinstance(trace, RoutingTrace)
    assert trace.domains == ["python", "german", "english"]
    assert [s.shape[1] for s in trace.seqs] == [12, 9, 2]  # truncated to seq_len, padding dropped
    assert trace.prefetch is not None and sorted(trace.prefetch) == [1, 2]  # 3 layers: at most 2 ahead
    assert trace.meta["routers"] and trace.meta["gate_lookahead"] == 2
    # Tuples work as batches too.
    again = record_trace(model, [(torch.zeros(1, 3, dtype=torch.long), ["x"], None)], gate_lookahead=0)
    assert again.seqs[0].shape[1] == 3 and again.prefetch is None


def test_null_expert_model_records_and_analyses():
    """Issue 11 item 15: gate look-ahead on null-expert routers used to fail with 'expert ids must lie
    in 0..3' (top-k over the E + M logits)."""
    torch.manual_seed(2)
    model = Stack([{"kind": "null", "n_null": 4, "k": 2}] * 3).eval()
    batches = [(torch.randn(2, 16, 32), ["a", "b"], None), (torch.randn(1, 9, 32), ["a"], None)]
    trace = record_trace(model, batches, lambda x, mask: model(x), gate_lookahead=2)
    assert sorted(trace.prefetch) == [1, 2]
    assert all(p.max() < 4 for d in trace.prefetch for p in trace.prefetch[d])
    assert min(int((s >= 0).sum(axis=2).min()) for s in trace.seqs) < 2  # null picks happened
    m = compute_metrics(trace, AnalysisConfig(srp_n=(2,), n_boot=5, sch_n=(2,), model_sch_n=(2,), max_multiple=2,
                                              model_multiples=(1,), prefetch_distance=2, workers=1), progress=False)
    assert all(0 <= r <= 1 for r in m["prefetch"]["gate"]["1"][1:])
    assert m["cache"]["per_layer"]["policies"]["sch2"]["cold"][0] is not None


def test_capacity_dropping_records_what_ran():
    """Issue 11 item 15: with capacity_factor = 0.5 the trace counts the executed assignments
    (routing_info().counts_E), not the router's choice (which counted 128 where 64 ran)."""
    torch.manual_seed(3)
    model = Stack([{"kind": "topk", "k": 2}] * 2, capacity_factor=0.5).train()  # capacity drops in training
    x = torch.randn(2, 32, 32)
    with torch.no_grad(), TraceRecorder(model, gate_lookahead=1) as rec:
        rec.begin_batch(["a", "b"])
        model(x)
        infos = [layer.routing_info() for layer in model.layers]
    trace = rec.to_trace()
    counts_LE = expert_counts(trace)
    for layer, info in enumerate(infos):
        assert info.num_dropped > 0 and info.route.num_assignments == 128
        assert counts_LE[layer].tolist() == info.counts_E.tolist() and counts_LE[layer].sum() == 128 - info.num_dropped
    # record_trace (eval mode) agrees with routing_info too, whatever evaluation does with capacity.
    model.eval()
    trace = record_trace(model, [(x, ["a", "b"], None)], lambda ids, mask: model(ids), gate_lookahead=0)
    with torch.no_grad():
        model(x)
    assert expert_counts(trace).tolist() == [layer.routing_info().counts_E.tolist() for layer in model.layers]


def test_predictions_use_only_real_tokens():
    """Expert choice picks among the tokens it is given: padding must not take a slot in a prediction."""
    torch.manual_seed(4)
    model = Stack([{"kind": "expert_choice", "allow_causal_leak": True}] * 2).eval()
    x = torch.randn(1, 8, 32)
    mask = torch.tensor([[1] * 5 + [0] * 3], dtype=torch.bool)
    inputs = {}
    handle = model.layers[0].register_forward_hook(lambda m, a, o: inputs.__setitem__(0, a[0].reshape(-1, 32)))
    with torch.no_grad(), TraceRecorder(model, gate_lookahead=1) as rec:
        rec.begin_batch(["a"], mask)
        model(x, mask)
    handle.remove()
    pred = rec.to_trace().prefetch[1][0][1]
    choice = predict_route(model.layers[1].router, inputs[0][:5])
    expected = [set() for _ in range(5)]
    for t, e in zip(choice.token_idx_N.tolist(), choice.expert_idx_N.tolist(), strict=True):
        expected[t].add(e)
    assert [{e for e in row if e >= 0} for row in pred.tolist()] == expected
