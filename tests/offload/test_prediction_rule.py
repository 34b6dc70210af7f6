"""Offload's predictive prefetch and analysis' gate look-ahead predict with one rule
(moekit.routers.predict): on the very same hidden states, during one offloaded generation, the
experts the runtime prefetches for layer l are the ones the trace records as layer l's prediction."""

from __future__ import annotations

import pytest

from moekit.analysis.trace import TraceRecorder
from moekit.offload import offload, write_store
from moekit.offload.generate import decode_loop

from .conftest import tiny_lm


@pytest.mark.parametrize("router", [dict(kind="null", n_null=4, k=3), dict(kind="topp", p=0.5)],
                         ids=["null", "topp"])
def test_offload_prefetch_and_trace_lookahead_predict_alike(tmp_path, prompt, router):
    model = tiny_lm(**router)
    store = write_store(model, tmp_path / "s")
    with offload(model, store, "50%", "predictive") as rt, TraceRecorder(model, gate_lookahead=1) as rec:
        decode_loop(model, prompt, 8, runtime=rt, record=False)
    trace = rec.to_trace()  # one recorded batch per forward: the prefill, then one per decode token
    assert len(trace.seqs) == 8 and len(rt.predictions) >= 7 * 2 - 2
    sizes = set()
    for forward, layer, order in rt.predictions:
        predicted = trace.prefetch[1][forward][layer]  # (T = 1 decode token, J)
        assert sorted(order) == sorted(int(e) for e in predicted[0] if e >= 0), (forward, layer)
        sizes.add(len(order))
    assert len(sizes) > 1  # router-dependent prediction sizes: not a fixed top-K of the logits
