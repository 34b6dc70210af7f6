"""Token difficulty against experts used (arXiv 2403.07652's claim): Spearman on hand-checked
samples, next-token losses against cross-entropy, the trace column round trip, and the report."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import moekit
from moekit.analysis import (
    RoutingTrace,
    difficulty_vs_experts,
    load_trace,
    record_trace,
    save_trace,
    spearman,
)
from moekit.analysis.report import AnalysisConfig, compute_metrics
from moekit.analysis.report.html import render_html
from moekit.analysis.trace import TokenBatch, token_losses


def test_spearman_hand_checked_values():
    # one swapped pair: 1 - 6 * 2 / (4 * 15) = 0.8
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    # ties get average ranks: ranks (1, 2.5, 2.5, 4) against (1, 2, 3, 4) give 4.5 / sqrt(4.5 * 5)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(4.5 / math.sqrt(22.5))
    assert spearman([3, 2, 1], [10, 20, 30]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3], [5, 9, 1000]) == pytest.approx(1.0)  # ranks only: monotone is 1
    assert math.isnan(spearman([1, 2, 3], [2, 2, 2]))  # constant: undefined, never 0
    assert math.isnan(spearman([1, 2], [1, 2]))  # too few pairs
    with pytest.raises(ValueError, match="1-D samples of one length"):
        spearman([1, 2, 3], [1, 2])


def _trace(k_for_loss, token_loss, L=2, E=8, domains=None):
    seqs = []
    for loss_T in token_loss:
        T = len(loss_T)
        experts_LTK = np.full((L, T, E), -1, dtype=np.int64)
        for t, x in enumerate(loss_T):
            k = k_for_loss(x) if np.isfinite(x) else 1
            experts_LTK[:, t, :k] = np.arange(k)
        seqs.append(experts_LTK)
    return RoutingTrace(seqs, E, domains, token_loss=[np.asarray(x, dtype=np.float32) for x in token_loss])


def test_more_experts_for_harder_tokens_is_a_correlation_of_one():
    rng = np.random.default_rng(0)
    losses = [np.append(rng.uniform(0, 5, 20), np.nan), np.append(rng.uniform(0, 5, 15), np.nan)]
    d = difficulty_vs_experts(_trace(lambda x: 1 + int(x), losses, domains=["a", "b"]))
    assert d["n_tokens"] == 35  # the last token of each sequence (NaN: no next token) is left out
    assert d["overall"] == pytest.approx(spearman(np.concatenate([x[:-1] for x in losses]),
                                                  [2 * (1 + int(x)) for x in np.concatenate([x[:-1] for x in losses])]))
    assert d["overall"] > 0.9 and all(r > 0.9 for r in d["per_layer"])
    assert d["per_domain"]["a"]["n_tokens"] == 20 and d["per_domain"]["b"]["n_tokens"] == 15
    q = d["by_loss_quantile"]
    assert q["experts_mean"] == sorted(q["experts_mean"]) and len(q["loss_mean"]) == 5


def test_a_fixed_k_router_gives_an_undefined_correlation_not_zero():
    d = difficulty_vs_experts(_trace(lambda x: 2, [np.array([0.1, 2.0, 1.0, 3.0, np.nan])]))
    assert d["overall"] is None and d["per_layer"] == [None, None] and d["per_domain"] is None


def test_a_trace_without_losses_is_refused_by_name():
    t = RoutingTrace([np.zeros((1, 3, 1), dtype=np.int64)], 2)
    with pytest.raises(ValueError, match="no token losses"):
        difficulty_vs_experts(t)
    with pytest.raises(ValueError, match="token_loss of sequence 0 has shape"):
        RoutingTrace([np.zeros((1, 3, 1), dtype=np.int64)], 2, token_loss=[np.zeros(2)])


def test_token_losses_are_next_token_cross_entropy_with_nan_where_nothing_follows():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5)
    ids = torch.tensor([[1, 2, 3, 4], [0, 1, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    loss = token_losses(logits, ids, mask)
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, 5), ids[:, 1:].reshape(-1), reduction="none").view(2, 3)
    torch.testing.assert_close(loss[0, :3], ce[0])
    assert loss[1, 0] == pytest.approx(ce[1, 0].item())
    assert torch.isnan(loss[0, 3]) and torch.isnan(loss[1, 1:]).all()  # last real token, padding
    uniform = token_losses(torch.zeros(1, 3, 4), torch.tensor([[0, 1, 2]]))
    torch.testing.assert_close(uniform[0, :2], torch.full((2,), math.log(4)))


class TinyLM(torch.nn.Module):
    """Embedding -> top-p MoE layer -> vocabulary: the smallest model with logits and a dynamic k."""

    def __init__(self, V=11, D=16):
        super().__init__()
        self.emb = torch.nn.Embedding(V, D)
        self.moe = moekit.MoELayer(moekit.MoEConfig(d_model=D, d_expert=32, num_experts=4,
                                                    router=moekit.RouterConfig(kind="topp", p=0.5)))
        self.out = torch.nn.Linear(D, V)

    def forward(self, ids):
        x = self.emb(ids)
        return self.out(x + self.moe(x))



@pytest.mark.parametrize("bad", [4, -1])
def test_token_losses_refuse_ids_outside_the_logits_vocabulary(bad):
    # Before the check: torch's gather error ("index 4 is out of bounds for dimension 2 with size 4").
    with pytest.raises(moekit.errors.UsageError, match=rf"^token_losses: token id\(s\) {bad} out of range; "
                                                       r"expected token ids in \[0, 4\) \(the logits' vocabulary\)$"):
        token_losses(torch.zeros(1, 3, 4), torch.tensor([[0, bad, 2]]))


def test_record_trace_keeps_the_models_losses_and_the_file_keeps_them(tmp_path):
    torch.manual_seed(0)
    model = TinyLM()
    ids = torch.randint(0, 11, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[2, 6:] = False
    trace = record_trace(model, [TokenBatch(ids, ["x", "y", "x"], mask)], token_loss=True, gate_lookahead=0)
    with torch.no_grad():
        expected = token_losses(model(ids), ids, mask)
    assert [x.shape for x in trace.token_loss] == [(9,), (9,), (6,)]
    np.testing.assert_allclose(trace.token_loss[2], expected[2, :6].numpy(), rtol=1e-6)
    back = load_trace(save_trace(trace, tmp_path / "t.trace"))
    for a, b in zip(back.token_loss, trace.token_loss, strict=True):
        np.testing.assert_array_equal(a, b)  # NaNs included
    plain = load_trace(save_trace(record_trace(model, [TokenBatch(ids)], gate_lookahead=0), tmp_path / "p.trace"))
    assert plain.token_loss is None  # traces without the column load as before

    m = compute_metrics(trace, AnalysisConfig(workers=1, srp_n=(4,), n_boot=5, sch_n=(4,), model_sch_n=(4,),
                                              max_multiple=2, model_multiples=(1,)), progress=False)
    dif = m["difficulty"]
    assert dif["n_tokens"] == 8 + 8 + 5
    assert dif["per_domain"].keys() == {"x", "y"}
    assert "Harder tokens, more experts?" in render_html(m, {})
    assert compute_metrics(plain, AnalysisConfig(workers=1, srp_n=(4,), n_boot=5, sch_n=(4,), model_sch_n=(4,),
                                                 max_multiple=2, model_multiples=(1,)),
                           progress=False)["difficulty"] is None
