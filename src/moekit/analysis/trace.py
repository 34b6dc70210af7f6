"""Record routing traces from any module that contains moekit MoELayers.

Stages, per forward of a batch:
  1. a forward hook on every MoELayer (module order = layer order) reads `routing_info().executed`:
     the assignments of the valid tokens that ran (after bias correction, group limits, top-p, null
     experts and capacity dropping) and their weights, viewed as padded (tokens, K) arrays;
  2. padding tokens are dropped with the batch's padding mask (the one given to `begin_batch`,
     else the layer's own `padding_mask` argument), so a token that used no expert stays a row;
  3. optionally (gate_lookahead = G > 0) layer l's router predicts, from the input of layer l - d
     (d = 1..G), the experts it would pick (`moekit.routers.predict`, the rule offload's predictive
     prefetch uses too): the gate look-ahead a trace alone cannot reconstruct;
  4. optionally, `add_token_loss(loss_BT)` after the forward gives each token's next-token loss
     (`token_losses` computes it from the logits; record_trace(token_loss=True) does both);
  5. `end_batch` cuts the batch into sequences, each with its domain label.

    with TraceRecorder(model) as rec:
        rec.begin_batch(domains=["python", "german"], padding_mask=mask_BT)
        model(ids_BT)
    rec.save("routing.trace")            # or rec.to_trace() -> RoutingTrace

`record_trace(model, batches)` runs this loop over TokenBatch items in eval mode, no_grad.
Legend: B sequences in a batch, T tokens, D model dim, E experts, K experts per token (executed or
predicted; padded with -1), A the batch's non-padding tokens.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from moekit.analysis.routing_trace import RoutingTrace
from moekit.analysis.tracefile import save_trace
from moekit.layers.moe import MoELayer, moe_layer_names, moe_layers
from moekit.routers.predict import can_predict, predict_experts
from moekit.utils.ids import check_token_ids

__all__ = ["TokenBatch", "TraceRecorder", "corpus_batches", "record_trace", "token_losses"]


@dataclass
class TokenBatch:
    """One batch to record: token ids, a domain label per sequence, and which tokens are real."""

    ids_BT: torch.Tensor
    domains: Sequence[str] | None = None
    padding_mask_BT: torch.Tensor | None = None  # True/1 = real token


@dataclass
class _LayerCall:
    ids_BTK: np.ndarray
    weights_BTK: np.ndarray
    valid_BT: np.ndarray
    preds: dict[int, np.ndarray]  # distance -> predicted_BTK
    iters_BTK: np.ndarray | None = None  # Chain-of-Experts iteration masks (None: one iteration)


class TraceRecorder:
    """Context manager recording executed routing of every MoELayer in `model` (see module doc).

    gate_lookahead: how many layers ahead to record router-based predictions (0 = none; capped at
        L - 1). Layers whose router cannot predict from a token (recurrent) get none.
    Several forwards without `begin_batch` in between are recorded as separate unlabelled batches;
    with `begin_batch`, one forward per batch is expected (a layer running twice is an error).
    """

    def __init__(self, model: nn.Module, gate_lookahead: int = 3):
        layers = moe_layers(model)
        if not layers:
            raise ValueError(f"TraceRecorder: {type(model).__name__} contains no moekit MoELayer to record")
        if gate_lookahead < 0:
            raise ValueError(f"gate_lookahead must be >= 0, got {gate_lookahead}")
        self.layer_names = moe_layer_names(model)
        self.layers = layers
        # A pruned model's layers may keep different expert counts: the trace's E is the largest (every
        # layer's ids lie below it) and the meta records each layer's own count.
        self.experts_per_layer = [m.router.num_experts for m in self.layers]
        self.num_experts = max(self.experts_per_layer)
        self.gate_lookahead = min(gate_lookahead, len(self.layers) - 1)  # no layer lies further ahead
        self._index = {id(m): i for i, m in enumerate(self.layers)}
        self._handles: list = []
        self._seqs: list[np.ndarray] = []
        self._weights: list[np.ndarray] = []
        self._preds: dict[int, list[np.ndarray]] = {d: [] for d in range(1, self.gate_lookahead + 1)}
        self._domains: list[str | None] = []
        self._losses: list[np.ndarray | None] = []
        self._batch_loss: np.ndarray | None = None
        self._iters: list[np.ndarray] = []  # Chain-of-Experts iteration masks, once any layer has them
        self._batch_domains: list[str] | None = None
        self._batch_mask: np.ndarray | None = None
        self._explicit = False
        self._calls: dict[int, _LayerCall] = {}
        self._inputs: dict[int, torch.Tensor] = {}  # gate inputs of recent layers, for lookahead

    # ------------------------------------------------------------------ hooks

    def __enter__(self) -> TraceRecorder:
        for m in self.layers:
            self._handles.append(m.register_forward_hook(self._hook, with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if exc[0] is None and self._calls:
            self.end_batch()

    def _hook(self, module: MoELayer, args: tuple, kwargs: dict, output) -> None:
        i = self._index[id(module)]
        if i in self._calls:
            if self._explicit or i != 0:
                raise RuntimeError(f"TraceRecorder: MoE layer {i} ({self.layer_names[i]}) ran twice in one batch; "
                                   f"call begin_batch() before each forward (one forward per batch)")
            self.end_batch()  # implicit batches: a new forward starts at the first layer
        x = args[0] if args else kwargs["x"]
        layer_mask = args[1] if len(args) > 1 else kwargs.get("padding_mask")
        lead = tuple(x.shape[:-1])
        info = module.routing_info()
        # NOTE: the executed assignments (after capacity dropping), not the router's choice: a trace
        # replays what the experts computed (RoutingInfo.route keeps the choice).
        ran = info.executed if info.executed is not None else info.route
        iters_TK = None
        if info.iteration_N is None:
            ids_TK, w_TK = ran.to_padded()
        else:
            ids_TK, w_TK, iters_TK = _merge_iterations(ran, info.iteration_N)
        T_flat = ids_TK.shape[0]
        if self._batch_mask is not None:
            if self._batch_mask.size != T_flat:
                raise ValueError(f"TraceRecorder: begin_batch padding_mask has {self._batch_mask.size} tokens, "
                                 f"MoE layer {i} saw {T_flat}")
            valid_BT = self._batch_mask
        elif layer_mask is not None:
            valid_BT = layer_mask.detach().to("cpu", torch.bool).numpy().reshape(lead if len(lead) == 2 else (1, -1))
        else:
            valid_BT = np.ones(lead if len(lead) == 2 else (1, T_flat), dtype=bool)
        B, T = valid_BT.shape
        K = ids_TK.shape[1]
        preds = {}
        x_TD = x.detach().reshape(T_flat, -1)
        if self.gate_lookahead:
            valid_T = torch.as_tensor(valid_BT.reshape(-1), device=x_TD.device)
            for d in range(1, self.gate_lookahead + 1):
                if i - d < 0 or not can_predict(module.router):
                    continue
                src_TD = self._inputs.get(i - d)
                if src_TD is None:
                    raise RuntimeError(f"TraceRecorder: MoE layer {i - d} did not run before layer {i}; the gate "
                                       f"look-ahead needs the layers to run in module order (use gate_lookahead=0)")
                # Only real tokens are routed, as the layer routes them (expert choice picks among them).
                pred_AK = predict_experts(module.router, src_TD[valid_T], module.cfg.num_experts)
                pred_TK = pred_AK.new_full((T_flat, pred_AK.shape[1]), -1)
                pred_TK[valid_T] = pred_AK
                preds[d] = pred_TK.to("cpu").numpy().reshape(B, T, -1)
            self._inputs[i] = x_TD
            self._inputs.pop(i - self.gate_lookahead, None)
        self._calls[i] = _LayerCall(ids_TK.to("cpu").numpy().reshape(B, T, K),
                                    w_TK.to("cpu", torch.float32).numpy().reshape(B, T, K), valid_BT, preds,
                                    None if iters_TK is None else iters_TK.to("cpu").numpy().reshape(B, T, K))

    # ------------------------------------------------------------------ batches

    def begin_batch(self, domains: Sequence[str] | None = None,
                    padding_mask: torch.Tensor | np.ndarray | None = None) -> None:
        """Label the next forward: one domain per sequence (None = unlabelled) and, optionally,
        a (B, T) mask with True for real tokens (else the layers' own padding_mask, else all)."""
        if self._calls:
            self.end_batch()
        self._explicit = True
        self._batch_domains = None if domains is None else [str(d) for d in domains]
        if padding_mask is None:
            self._batch_mask = None
        else:
            m = padding_mask.detach().cpu().numpy() if isinstance(padding_mask, torch.Tensor) else np.asarray(padding_mask)
            if m.ndim != 2:
                raise ValueError(f"begin_batch: padding_mask must be (B, T), got shape {m.shape}")
            self._batch_mask = m.astype(bool)

    def add_token_loss(self, loss_BT: torch.Tensor | np.ndarray) -> None:
        """The next-token loss (B, T) of the forward just run (NaN where there is none), kept with
        the trace (`RoutingTrace.token_loss`); call it after the forward, before `end_batch`."""
        if not self._calls:
            raise RuntimeError("TraceRecorder.add_token_loss: no forward recorded in this batch yet")
        loss = loss_BT.detach().to("cpu", torch.float32).numpy() if isinstance(loss_BT, torch.Tensor) else loss_BT
        self._batch_loss = np.asarray(loss, dtype=np.float32)

    def end_batch(self) -> None:
        """Cut the recorded forward into sequences (called by begin_batch and on exit)."""
        calls, self._calls = self._calls, {}
        loss_BT, self._batch_loss = self._batch_loss, None
        self._inputs.clear()
        domains, self._batch_domains, self._explicit = self._batch_domains, None, False
        self._batch_mask = None
        if not calls:
            return
        missing = [i for i in range(len(self.layers)) if i not in calls]
        if missing:
            raise RuntimeError(f"TraceRecorder: MoE layers {missing} did not run in this batch; a trace needs "
                               f"every layer for every token")
        valid_BT = calls[0].valid_BT
        B = valid_BT.shape[0]
        if domains is not None and len(domains) != B:
            raise ValueError(f"begin_batch: {len(domains)} domain labels for a batch of {B} sequences")
        L = len(self.layers)
        if loss_BT is not None and loss_BT.shape != valid_BT.shape:
            raise ValueError(f"TraceRecorder.add_token_loss: got shape {loss_BT.shape}, the batch has {valid_BT.shape}")

        def stack(b: np.ndarray, get, fill, dtype) -> np.ndarray:
            """(L, T_b, width) for sequence b from each layer's (B, T, width_l) array (None = none)."""
            arrays = [get(calls[i]) for i in range(L)]
            width = max((a.shape[2] for a in arrays if a is not None), default=0)
            out = np.full((L, int(valid_BT[b].sum()), width), fill, dtype=dtype)
            for i, a in enumerate(arrays):
                if a is not None:
                    out[i, :, :a.shape[2]] = a[b][valid_BT[b]]
            return out

        for b in range(B):
            self._seqs.append(stack(b, lambda c: c.ids_BTK, -1, np.int64))
            self._weights.append(stack(b, lambda c: c.weights_BTK, 0.0, np.float32))
            for d in self._preds:
                self._preds[d].append(stack(b, lambda c, d=d: c.preds.get(d), -1, np.int64))
            self._domains.append(None if domains is None else domains[b])
            self._losses.append(None if loss_BT is None else loss_BT[b][valid_BT[b]])
            if any(c.iters_BTK is not None for c in calls.values()) or self._iters:
                self._iters.append(stack(b, lambda c: c.iters_BTK if c.iters_BTK is not None
                                         else (c.ids_BTK >= 0).astype(np.uint8), 0, np.uint8))

    def to_trace(self, meta: dict | None = None) -> RoutingTrace:
        """Everything recorded so far as a RoutingTrace."""
        if self._calls:
            self.end_batch()
        if not self._seqs:
            raise RuntimeError("TraceRecorder: nothing recorded; run a forward inside the `with` block")
        labelled = [d is not None for d in self._domains]
        if any(labelled) and not all(labelled):
            raise ValueError("TraceRecorder: some batches have domain labels and others not; label every batch")
        routers = sorted({f"{m.cfg.router.kind}({m.cfg.router.describe()})" for m in self.layers})
        meta = {"routers": routers, "gate_lookahead": self.gate_lookahead, **(meta or {})}
        if len(set(self.experts_per_layer)) > 1:
            meta["experts_per_layer"] = self.experts_per_layer
        preds = {d: p for d, p in self._preds.items() if p}
        with_loss = [x is not None for x in self._losses]
        if any(with_loss) and not all(with_loss):
            raise ValueError("TraceRecorder: some batches have token losses and others not; give every batch one")
        iters = None
        if self._iters:
            if len(self._iters) != len(self._seqs):
                raise RuntimeError("TraceRecorder: some batches have Chain-of-Experts iterations and others not")
            iters = list(self._iters)
        return RoutingTrace(list(self._seqs), self.num_experts, self._domains if all(labelled) else None,
                            list(self._weights), preds or None, self.layer_names, meta,
                            token_loss=list(self._losses) if all(with_loss) else None, iterations=iters)

    def save(self, path: str | os.PathLike, meta: dict | None = None) -> Path:
        return save_trace(self.to_trace(meta), path)


def token_losses(logits_BTV: torch.Tensor, ids_BT: torch.Tensor, padding_mask_BT: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """Next-token loss (B, T) float32 in nats: -log softmax(logits[b, t])[ids[b, t + 1]], NaN at the
    last real token of each sequence and at padding (there is no next token to predict). Raises UsageError for
    ids outside [0, V) (torch's gather raised a raw error)."""
    B, T = ids_BT.shape
    if logits_BTV.shape[:2] != (B, T):
        raise ValueError(f"token_losses: logits of shape {tuple(logits_BTV.shape)} for ids of shape {(B, T)}")
    check_token_ids(ids_BT[:, 1:], logits_BTV.shape[-1], "token_losses", "the logits' vocabulary", host=True)
    loss_BT = torch.full((B, T), float("nan"), dtype=torch.float32, device=logits_BTV.device)
    if T > 1:
        logp = torch.log_softmax(logits_BTV[:, :-1].float(), dim=-1)
        loss_BT[:, :-1] = -logp.gather(-1, ids_BT[:, 1:, None]).squeeze(-1)
    if padding_mask_BT is not None:
        real_BT = padding_mask_BT.to(torch.bool)
        has_next_BT = torch.zeros_like(real_BT)
        has_next_BT[:, :-1] = real_BT[:, 1:]
        loss_BT = loss_BT.masked_fill(~(real_BT & has_next_BT), float("nan"))
    return loss_BT
def _merge_iterations(ran, iteration_N: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids_TK, weights_TK, iteration masks_TK) of a Chain-of-Experts layer's executed assignments: one
    slot per (token, expert), its weight summed over the iterations that ran it, bit t of its mask set
    where iteration t did (a token's slots in ascending expert order; padding -1 / 0 / 0)."""
    E = ran.num_experts
    key_N = ran.token_idx_N * E + ran.expert_idx_N
    key_U, inv_N = torch.unique(key_N, return_inverse=True)
    w_U = ran.weight_N.new_zeros(key_U.numel()).index_add(0, inv_N, ran.weight_N)
    # Each (token, expert, iteration) occurs once, so a sum of distinct bits is their OR.
    bits_U = torch.zeros_like(key_U).index_add(0, inv_N, torch.ones_like(iteration_N) << iteration_N)
    merged = dataclasses.replace(ran, token_idx_N=key_U // E, expert_idx_N=key_U % E, weight_N=w_U)
    ids_TK, w_TK = merged.to_padded()
    _, bits_TK = dataclasses.replace(merged, weight_N=bits_U.double()).to_padded()
    return ids_TK, w_TK, bits_TK.to(torch.uint8)


def record_trace(model: nn.Module, batches: Iterable[TokenBatch], forward: Callable | None = None, *,
                 gate_lookahead: int = 3, meta: dict | None = None, progress: bool = False,
                 token_loss: bool = False) -> RoutingTrace:
    """Run `forward(ids_BT, padding_mask_BT)` over `batches` (default: `model(ids_BT)`) in eval mode
    without gradients and return the recorded trace. Training flags are restored afterwards.
    token_loss: also keep each token's next-token loss (`RoutingTrace.token_loss`); `forward` must then
    return logits (B, T, V) or an object with `.logits`.

    For a causal LM with right padding the default forward is correct: padding tokens come after
    the real ones and are dropped from the trace. Pass `forward` to hand the model its mask, e.g.
    `lambda ids, mask: hf_model(input_ids=ids, attention_mask=mask)`.
    """
    if forward is None:
        def forward(ids_BT, _mask):
            return model(ids_BT)
    was_training = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad(), TraceRecorder(model, gate_lookahead) as rec:
            items = batches
            if progress:
                from tqdm.auto import tqdm
                items = tqdm(batches, desc="recording routing", unit="batch")
            for batch in items:
                if not isinstance(batch, TokenBatch):
                    batch = TokenBatch(*batch)
                rec.begin_batch(batch.domains, batch.padding_mask_BT)
                out = forward(batch.ids_BT, batch.padding_mask_BT)
                if token_loss:
                    logits = getattr(out, "logits", out)
                    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
                        raise ValueError("record_trace(token_loss=True): the forward must return logits (B, T, V) "
                                         f"or an object with .logits, got {type(out).__name__}")
                    rec.add_token_loss(token_losses(logits, batch.ids_BT, batch.padding_mask_BT))
                rec.end_batch()
        return rec.to_trace(meta)
    finally:
        for m, flag in was_training.items():
            m.training = flag


def corpus_batches(samples: Sequence, tokenizer, seq_len: int = 256, batch_size: int = 8,
                   device: str | torch.device = "cpu") -> Iterable[TokenBatch]:
    """Batches of the corpus samples (`moekit.data.load_corpus`): the first `seq_len` tokens of each
    sample, one sequence per sample, right-padded, labelled with the sample's domain."""
    if seq_len < 1 or batch_size < 1:
        raise ValueError(f"seq_len and batch_size must be >= 1, got {seq_len}, {batch_size}")
    pad = getattr(tokenizer, "pad_id", 0)
    for b0 in range(0, len(samples), batch_size):
        chunk = samples[b0:b0 + batch_size]
        encoded = [tokenizer.encode(s.text)[:seq_len] for s in chunk]
        T = max(1, max(len(e) for e in encoded))
        ids = torch.full((len(chunk), T), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), T), dtype=torch.bool)
        for b, e in enumerate(encoded):
            ids[b, :len(e)] = torch.tensor(e, dtype=torch.long)
            mask[b, :len(e)] = True
        yield TokenBatch(ids.to(device), [s.domain for s in chunk], mask.to(device))
