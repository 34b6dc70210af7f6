"""Calibration: what each routed expert of each MoE layer does on some text, read from the layers'
routing (`RoutingInfo.executed`: the assignments after capacity dropping).

Legend: T tokens, D model dim, E experts of a layer, N assignments, L MoE layers.

Per (layer, expert), over the calibration tokens:
  count_E        executed assignments (frequency)
  gate_sum_E     sum of the executed combine weights
  score_sum_E    sum over routed tokens of the router's probability s_te (`scores_TE`)
  score_all_E    sum over all tokens of s_te (PreMoe's expected selection, arXiv 2505.17639)
  reap_sum_E     sum over routed tokens of s_te * ||E_e(x_t)||_2: REAP saliency (
                 CerebrasResearch/reap pruning_metrics.py: the mean over the tokens routed to e of the
                 router weight, the softmax of the logits, not renormalised, times the norm of e's output)
  norm_sum_E     sum of ||E_e(x_t)||_2 over routed tokens (expert activation norm)
  max_abs_E      max |E_e(x_t)| over routed tokens and channels (super experts, arXiv 2507.23279)
  logit_gram_EE  sum over tokens of logits_t logits_t^T: the router-logit similarity of experts
                 (M-SMoE, arXiv 2310.01334) as cosines of its entries, without keeping (T, E) logits
  out_sum_ED     (only with `outputs=True`) sum over ALL tokens of E_e(x_t): HC-SMoE's expert
                 representation (arXiv 2410.08589), computed one expert at a time
  inputs_TD      up to `keep_inputs` of the layer's input rows, for reconstruction errors

Expert outputs are recomputed from the layer input with the one expert FFN (moekit.ops.ffn), one
expert at a time, over that expert's routed rows only: no (T, E, D) tensor is built.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from moekit.data import DOMAINS, encode_samples, load_corpus
from moekit.errors import UsageError
from moekit.layers.moe import MoELayer, moe_layers
from moekit.ops.ffn import expert_ffn

__all__ = ["Calibration", "LayerStats", "calibrate", "calibration_windows"]


@dataclass
class LayerStats:
    """One MoE layer's calibration sums (see the module doc); float64 on CPU."""

    tokens: int
    count_E: torch.Tensor
    gate_sum_E: torch.Tensor
    score_sum_E: torch.Tensor
    score_all_E: torch.Tensor
    reap_sum_E: torch.Tensor
    norm_sum_E: torch.Tensor
    max_abs_E: torch.Tensor
    logit_gram_EE: torch.Tensor
    out_sum_ED: torch.Tensor | None = None
    inputs_TD: torch.Tensor | None = None

    @staticmethod
    def zeros(E: int, D: int, outputs: bool) -> LayerStats:
        z = lambda *s: torch.zeros(*s, dtype=torch.float64)  # noqa: E731
        return LayerStats(0, z(E), z(E), z(E), z(E), z(E), z(E), z(E), z(E, E), z(E, D) if outputs else None)

    @property
    def num_experts(self) -> int:
        return self.count_E.numel()

    def frequency_E(self) -> torch.Tensor:
        """Share of the layer's tokens routed to each expert."""
        return self.count_E / max(self.tokens, 1)

    def reap_E(self) -> torch.Tensor:
        """REAP saliency: mean over routed tokens of s_te * ||E_e(x_t)|| (0 for an unused expert)."""
        return self.reap_sum_E / self.count_E.clamp(min=1)

    def mean_gate_E(self) -> torch.Tensor:
        """Mean executed combine weight over the expert's routed tokens."""
        return self.gate_sum_E / self.count_E.clamp(min=1)

    def expected_score_E(self) -> torch.Tensor:
        """Mean router probability over all tokens (PreMoe's task-conditioned expected selection score)."""
        return self.score_all_E / max(self.tokens, 1)

    def logit_similarity_EE(self) -> torch.Tensor:
        """Cosine similarity of the experts' router-logit columns over the calibration tokens."""
        d = self.logit_gram_EE.diagonal().clamp(min=1e-30).sqrt()
        return self.logit_gram_EE / d[:, None] / d[None, :]

    def mean_output_ED(self) -> torch.Tensor:
        if self.out_sum_ED is None:
            raise UsageError("calibration ran without outputs=True: HC-SMoE needs each expert's mean output")
        return self.out_sum_ED / max(self.tokens, 1)

    def __add__(self, other: LayerStats) -> LayerStats:
        if other.num_experts != self.num_experts:
            raise ValueError(f"calibrations of {self.num_experts} and {other.num_experts} experts cannot be added")
        out = {}
        for f in dataclasses.fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if f.name == "max_abs_E":
                out[f.name] = torch.maximum(a, b)
            elif f.name == "inputs_TD":
                out[f.name] = a if b is None else b if a is None else torch.cat([a, b])
            elif a is None or b is None:
                out[f.name] = None
            else:
                out[f.name] = a + b
        return LayerStats(**out)


@dataclass
class Calibration:
    """Calibration sums of every MoE layer (`layers[l]`, in `moe_layers` order), and the source text."""

    layers: list[LayerStats]
    source: str = ""
    by_domain: dict[str, Calibration] = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        return self.layers[0].tokens if self.layers else 0

    def __add__(self, other: Calibration) -> Calibration:
        if len(other.layers) != len(self.layers):
            raise ValueError("calibrations of models with different MoE layer counts cannot be added")
        return Calibration([a + b for a, b in zip(self.layers, other.layers, strict=True)],
                           f"{self.source}+{other.source}")

    def summary(self) -> dict:
        return {"source": self.source, "tokens": self.tokens, "layers": len(self.layers),
                "unused_experts": [int((s.count_E == 0).sum()) for s in self.layers]}


def calibration_windows(tokenizer, source: str | Iterable[str], seq_len: int = 128,
                        tokens: int = 8192) -> dict[str, torch.Tensor]:
    """Token windows (n, seq_len) to calibrate on, by source name.

    source: domain names of the embedded corpus (a comma-separated string or a list; "all" = every
    domain), read from its TRAIN split (calibration never sees validation text), or the path of a
    UTF-8 text file. At most `tokens` tokens per source. Raises UsageError naming the problem.
    """
    if isinstance(source, str) and Path(source).is_file():
        try:
            text = Path(source).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise UsageError(f"--calib {source}: the file is not UTF-8 text") from None
        ids = np.asarray(tokenizer.encode(text), dtype=np.int64)
        return {Path(source).name: _windows(ids, seq_len, tokens, f"--calib {source}")}
    names = [s.strip() for s in (source.split(",") if isinstance(source, str) else source) if s.strip()]
    if names == ["all"]:
        names = list(DOMAINS)
    unknown = [n for n in names if n not in DOMAINS]
    if unknown or not names:
        raise UsageError(f"--calib {source!r}: {', '.join(unknown) or 'nothing'} is neither a text file nor a domain; "
                         f"allowed: a UTF-8 text file, 'all' or domains among {', '.join(DOMAINS)}")
    out = {}
    for name in names:
        ids, _ = encode_samples(load_corpus("train", name), tokenizer)
        out[name] = _windows(ids.astype(np.int64), seq_len, tokens, f"the train split of {name!r}")
    return out


def _windows(ids: np.ndarray, seq_len: int, tokens: int, what: str) -> torch.Tensor:
    n = min(len(ids) // seq_len, max(1, tokens // seq_len))
    if n < 1:
        raise UsageError(f"{what} holds {len(ids)} tokens, fewer than one window of {seq_len}; give more text")
    # Spread the windows over the text rather than taking its beginning.
    starts = np.linspace(0, len(ids) - seq_len, n).astype(np.int64)
    return torch.from_numpy(ids[starts[:, None] + np.arange(seq_len)[None, :]])


def expert_output(layer: MoELayer, e: int, x_ND: torch.Tensor) -> torch.Tensor:
    """The router's expert `e` of `layer` applied to rows x_ND (float32), through the bank's own layout,
    activation (clamped SwiGLU included) and biases (merged layers: the bank's expert it maps to;
    quantised banks: dequantised)."""
    bank = layer.experts
    p = e if layer.expert_map_E is None else int(layer.expert_map_E[e])
    if hasattr(bank, "expert_weights"):  # QuantizedExpertBank: standard SwiGLU stacks
        w_in, w_down = bank.expert_weights(p)
        return expert_ffn(x_ND, w_in.float(), w_down.float(), bank.activation)
    w_in, w_out, b_in, b_out = bank.expert(p)
    w_in = tuple(w.float() for w in w_in) if isinstance(w_in, tuple) else w_in.float()
    return expert_ffn(x_ND, w_in, w_out.float(), bank.act, b_in_X=None if b_in is None else b_in.float(),
                      b_out_D=None if b_out is None else b_out.float())


@torch.no_grad()
def _layer_stats(layer: MoELayer, x_TD: torch.Tensor, stats: LayerStats, keep_inputs: int) -> None:
    route = layer.routing_info().executed
    h_TD, x_TD = x_TD, layer.expert_input(x_TD).float()  # the layer's input; what its experts read (latent: l dims)
    T = x_TD.shape[0]
    scores_TE, logits_TE = route.scores_TE.double(), route.logits_TE[:, :stats.num_experts].double()
    stats.tokens += T
    stats.score_all_E += scores_TE[:, :stats.num_experts].sum(0)
    stats.logit_gram_EE += logits_TE.T @ logits_TE
    tok_N, exp_N, w_N = route.token_idx_N, route.expert_idx_N, route.weight_N.double()
    stats.count_E += torch.bincount(exp_N, minlength=stats.num_experts).double()
    stats.gate_sum_E += torch.zeros(stats.num_experts, dtype=torch.float64).index_add_(0, exp_N, w_N)
    for e in torch.unique(exp_N).tolist():
        rows = tok_N[exp_N == e]
        y_ND = expert_output(layer, e, x_TD[rows])
        norm_N = y_ND.double().norm(dim=-1)
        s_N = scores_TE[rows, e]
        stats.score_sum_E[e] += s_N.sum()
        stats.reap_sum_E[e] += (s_N * norm_N).sum()
        stats.norm_sum_E[e] += norm_N.sum()
        stats.max_abs_E[e] = max(float(stats.max_abs_E[e]), float(y_ND.abs().max()))
    if stats.out_sum_ED is not None:
        for e in range(stats.num_experts):  # every token through every expert, one expert at a time
            stats.out_sum_ED[e] += expert_output(layer, e, x_TD).double().sum(0)
    have = 0 if stats.inputs_TD is None else stats.inputs_TD.shape[0]
    if have < keep_inputs:
        new = h_TD[: keep_inputs - have].float().detach().clone()
        stats.inputs_TD = new if stats.inputs_TD is None else torch.cat([stats.inputs_TD, new])


def _check_calibratable(i: int, layer: MoELayer) -> None:
    """UsageError for a layer whose router scores columns past its experts (zero-computation experts, router-weighted
    shared experts): pruning, merging and quantising rank and rewrite the experts' rows and columns only."""
    cfg = layer.cfg
    extra = cfg.router_slots - cfg.num_experts
    if not extra:
        return
    if cfg.num_zero_compute:
        fields = ", ".join(f"{name}={getattr(cfg, name)}" for name in ("zero_experts", "copy_experts", "constant_experts")
                           if getattr(cfg, name))
        what = f"{cfg.num_zero_compute} zero-computation experts ({fields}; MoE++, LongCat-Flash)"
    else:
        what = f"{extra} router-weighted shared-expert columns"
    raise UsageError(f"calibrate: MoE layer {i} routes to {what} past its {cfg.num_experts} experts, which pruning, "
                     "merging and quantising do not handle; expected a layer whose router scores its experts only")


@torch.no_grad()
def calibrate(model: nn.Module, windows: torch.Tensor | Mapping[str, torch.Tensor], *, batch_size: int = 16,
              outputs: bool = False, keep_inputs: int = 2048, forward=None, progress=None) -> Calibration:
    """Run `model` over calibration windows and collect per-(layer, expert) statistics (module doc).

    windows: (n, seq_len) int64 token ids, or {source name: windows} (then `by_domain` holds one
    Calibration per source, and the result their sum). forward: how to run a batch (default
    `model(ids)`). outputs: also sum every expert's output over all tokens (HC-SMoE; E times the
    expert FLOPs). progress: a callable called with the number of windows done after each batch.
    Raises UsageError when the model has no moekit MoE layer.
    """
    if isinstance(windows, Mapping):
        parts = {name: calibrate(model, w, batch_size=batch_size, outputs=outputs, keep_inputs=keep_inputs,
                                 forward=forward, progress=progress) for name, w in windows.items()}
        total = None
        for part in parts.values():
            total = part if total is None else total + part
        total.source = ",".join(parts)
        total.by_domain = parts
        return total
    layers = moe_layers(model)
    if not layers:
        raise UsageError(f"calibrate: {type(model).__name__} holds no moekit MoE layer (wrap a transformers model "
                         "with moekit.hf.wrap first)")
    for i, m in enumerate(layers):
        _check_calibratable(i, m)
    stats = [LayerStats.zeros(m.router.num_experts, m.cfg.expert_dim, outputs) for m in layers]
    inputs: dict[int, torch.Tensor] = {}

    def pre_hook(module, args, kwargs):
        x = args[0] if args else kwargs["x"]
        inputs[id(module)] = x.reshape(-1, x.shape[-1])

    def post_hook(module, args, kwargs, out):
        i = index[id(module)]
        _layer_stats(module, inputs.pop(id(module)), stats[i], keep_inputs)

    index = {id(m): i for i, m in enumerate(layers)}
    handles = [m.register_forward_pre_hook(pre_hook, with_kwargs=True) for m in layers]
    handles += [m.register_forward_hook(post_hook, with_kwargs=True) for m in layers]
    was_training = model.training
    model.eval()
    try:
        for start in range(0, windows.shape[0], batch_size):
            ids_BT = windows[start:start + batch_size]
            (forward or model)(ids_BT)
            if progress is not None:
                progress(ids_BT.shape[0])
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return Calibration(stats, "windows")
