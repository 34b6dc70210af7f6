"""`RoutingTrace`: the executed routing of several sequences, as analysis and offload read it.

A routing trace is a list of sequences, each an int array `experts_LTK` holding the *executed*
expert ids per layer and token, padded with -1 where a dynamic router used fewer than K_max experts.
Sequences may differ in T (and in K_max). Files: `moekit.analysis.tracefile` (docs/trace-format.md).

Legend (analysis letters, see moekit.analysis): L MoE layers, T tokens of one sequence, K expert
slots per token, executed or predicted (-1 marks an empty slot), E experts per layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["RoutingTrace"]


@dataclass
class RoutingTrace:
    """Executed routing of several sequences.

    seqs: one int array `experts_LTK` (L, T, K_max) per sequence; -1 pads empty slots.
    num_experts: E, experts per layer (ids lie in 0..E-1).
    domains: optional domain label per sequence.
    weights: optional combine weights, one float array per sequence shaped like its `seqs`
        entry (0 in padded slots).
    prefetch: optional router-based predictions {d: per-sequence `predicted_LTK`} (L and T as the
        sequence's experts, any width K): for layer l >= d, the experts layer l's router picks from
        the input of layer l - d (moekit.routers.predict), -1 = empty slot. A layer has predictions
        at distance d iff some token there has one (none for l < d or a recurrent router).
    layer_names: optional module name of each MoE layer.
    meta: free-form JSON-serialisable description (model, router, corpus, ...).
    token_loss: optional float32 `loss_T` per sequence: the model's next-token loss (nats) at each
        token, i.e. -log p(token t+1 | tokens <= t); NaN at the last token (nothing to predict). The
        difficulty analysis (`moekit.analysis.difficulty`) correlates it with the experts a token used.
    iterations: optional Chain-of-Experts iteration axis (arXiv 2506.18945), one uint8 array per
        sequence shaped like its `seqs` entry: bit t is set where iteration t of the layer ran that
        expert for that token (0 in padded slots). A slot lists an expert once, whatever the number
        of iterations that ran it (its weight is then the sum of theirs). None: one iteration (bit 0).
    """

    seqs: list[np.ndarray]
    num_experts: int
    domains: list[str] | None = None
    weights: list[np.ndarray] | None = None
    prefetch: dict[int, list[np.ndarray]] | None = None
    layer_names: list[str] | None = None
    meta: dict | None = None
    token_loss: list[np.ndarray] | None = None
    iterations: list[np.ndarray] | None = None

    def __post_init__(self) -> None:
        if self.num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {self.num_experts}")
        if not self.seqs:
            raise ValueError("a RoutingTrace needs at least one sequence")
        seqs = [np.asarray(s) for s in self.seqs]
        L = seqs[0].shape[0] if seqs[0].ndim == 3 else -1
        for i, s in enumerate(seqs):
            if s.ndim != 3 or s.shape[0] != L:
                raise ValueError(f"sequence {i}: expected experts_LTK of shape ({L}, T, K_max), got {s.shape}")
            if not np.issubdtype(s.dtype, np.integer):
                raise ValueError(f"sequence {i}: expert ids must be integers, got dtype {s.dtype}")
            _check_ids(s, self.num_experts, f"sequence {i}")
        self.seqs = [s.astype(np.int64, copy=False) for s in seqs]
        if self.domains is not None:
            self.domains = [str(d) for d in self.domains]
            if len(self.domains) != len(self.seqs):
                raise ValueError(f"domains has {len(self.domains)} labels for {len(self.seqs)} sequences")
        if self.weights is not None:
            self.weights = [np.asarray(w, dtype=np.float32) for w in self.weights]
            self._check_parallel(self.weights, "weights")
        if self.iterations is not None:
            self.iterations = [np.asarray(m).astype(np.uint8, copy=False) for m in self.iterations]
            self._check_parallel(self.iterations, "iterations")
            for i, (m, s) in enumerate(zip(self.iterations, self.seqs, strict=True)):
                if np.any((m == 0) != (s < 0)):
                    raise ValueError(f"iterations of sequence {i}: a used slot needs a nonzero iteration mask "
                                     "and a padded slot mask 0")
        if self.prefetch is not None:
            self.prefetch = {int(d): [np.asarray(p).astype(np.int64, copy=False) for p in preds]
                             for d, preds in self.prefetch.items()}
            for d, preds in self.prefetch.items():
                if d < 1:
                    raise ValueError(f"prefetch distance must be >= 1, got {d}")
                if len(preds) != len(self.seqs):
                    raise ValueError(f"prefetch[{d}] has {len(preds)} arrays for {len(self.seqs)} sequences")
                for i, (p, s) in enumerate(zip(preds, self.seqs, strict=True)):
                    if p.ndim != 3 or p.shape[:2] != s.shape[:2]:
                        raise ValueError(f"prefetch[{d}] of sequence {i} has shape {p.shape}, expected "
                                         f"({s.shape[0]}, {s.shape[1]}, J) (its layers and tokens)")
                    _check_ids(p, self.num_experts, f"prefetch[{d}] of sequence {i}")
        if self.token_loss is not None:
            self.token_loss = [np.asarray(x, dtype=np.float32) for x in self.token_loss]
            if len(self.token_loss) != len(self.seqs):
                raise ValueError(f"token_loss has {len(self.token_loss)} arrays for {len(self.seqs)} sequences")
            for i, (x, s) in enumerate(zip(self.token_loss, self.seqs, strict=True)):
                if x.shape != (s.shape[1],):
                    raise ValueError(f"token_loss of sequence {i} has shape {x.shape}, expected ({s.shape[1]},) "
                                     "(one value per token)")
        if self.layer_names is not None:
            self.layer_names = [str(n) for n in self.layer_names]
            if len(self.layer_names) != L:
                raise ValueError(f"layer_names has {len(self.layer_names)} names for {L} layers")

    def _check_parallel(self, arrays: list[np.ndarray], what: str) -> None:
        if len(arrays) != len(self.seqs):
            raise ValueError(f"{what} has {len(arrays)} arrays for {len(self.seqs)} sequences")
        for i, (a, s) in enumerate(zip(arrays, self.seqs, strict=True)):
            if a.shape != s.shape:
                raise ValueError(f"{what} of sequence {i} has shape {a.shape}, expected {s.shape} (its experts)")

    @classmethod
    def from_layer(cls, seqs_TK: Sequence[np.ndarray], num_experts: int,
                   domains: Sequence[str] | None = None) -> RoutingTrace:
        """A one-layer trace from per-sequence `experts_TK` arrays."""
        return cls([np.asarray(s)[None] for s in seqs_TK], num_experts, None if domains is None else list(domains))

    @property
    def num_layers(self) -> int:
        return self.seqs[0].shape[0]

    @property
    def num_tokens(self) -> int:
        return sum(s.shape[1] for s in self.seqs)

    @property
    def k_max(self) -> int:
        """Most experts any token uses at any layer."""
        return max(int((s >= 0).sum(axis=2).max()) if s.size else 0 for s in self.seqs)

    def subset(self, idx: Sequence[int]) -> RoutingTrace:
        """The trace restricted to the sequences `idx` (repeats allowed, e.g. for a bootstrap)."""
        idx = list(idx)
        doms = None if self.domains is None else [self.domains[i] for i in idx]
        w = None if self.weights is None else [self.weights[i] for i in idx]
        pf = None if self.prefetch is None else {d: [p[i] for i in idx] for d, p in self.prefetch.items()}
        loss = None if self.token_loss is None else [self.token_loss[i] for i in idx]
        its = None if self.iterations is None else [self.iterations[i] for i in idx]
        return RoutingTrace([self.seqs[i] for i in idx], self.num_experts, doms, w, pf, self.layer_names, self.meta,
                            token_loss=loss, iterations=its)

    def iteration_masks(self) -> list[np.ndarray]:
        """Per sequence the uint8 iteration mask of every slot (bit 0 for every used slot of a trace
        without an iteration axis; 0 in padded slots)."""
        if self.iterations is not None:
            return self.iterations
        return [(s >= 0).astype(np.uint8) for s in self.seqs]

    def stacked(self) -> np.ndarray:
        """experts_LTK of all sequences concatenated along T (padded to the global K_max)."""
        K = max(s.shape[2] for s in self.seqs)
        return np.concatenate([_pad_last(s, K) for s in self.seqs], axis=1)


def _pad_last(a_xK: np.ndarray, K: int) -> np.ndarray:
    if a_xK.shape[-1] == K:
        return a_xK
    pad = np.full((*a_xK.shape[:-1], K - a_xK.shape[-1]), -1, dtype=a_xK.dtype)
    return np.concatenate([a_xK, pad], axis=-1)


def _check_ids(experts_xK: np.ndarray, E: int, what: str) -> None:
    """Ids must lie in -1..E-1 and a token may not list the same expert twice."""
    if experts_xK.size == 0:
        return
    lo, hi = int(experts_xK.min()), int(experts_xK.max())
    if lo < -1 or hi >= E:
        raise ValueError(f"{what}: expert ids must lie in 0..{E - 1} (or -1 for padding), found {lo}..{hi}")
    srt = np.sort(experts_xK, axis=-1)
    if np.any((srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] >= 0)):
        raise ValueError(f"{what}: a token lists the same expert twice")
