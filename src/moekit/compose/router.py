"""The category router of a Composition of Experts: a text classifier over hashed byte n-grams.

Legend: N requests, X hashed features, C categories.

  features  each request's UTF-8 bytes (its first `max_bytes`) -> counts of its 1-, 2- and 3-byte
            n-grams hashed into X buckets -> log(1 + count) -> L2-normalised        (N, X) fp32
  logits    features @ weight.T + bias                                               (N, C)
  training  multinomial logistic regression (cross-entropy + weight decay, full batch, Adam)

NOTE: the paper (arXiv 2412.01868) fine-tunes a text-embedding model as its category router; a hashed
n-gram classifier is the smallest text classifier that needs nothing downloaded, and byte n-grams
separate languages and code well. Any classifier with `predict_proba(texts) -> (N, C)` can replace it.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from moekit.errors import UsageError

_MULT = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing: spreads n-gram codes over the buckets


def hashed_ngrams(text: str, num_features: int, max_bytes: int) -> np.ndarray:
    """(X,) fp32 features of one text (see the module doc); deterministic across processes."""
    b = np.frombuffer(text.encode("utf-8")[:max_bytes], dtype=np.uint8).astype(np.uint64)
    codes = [b]
    if len(b) >= 2:
        codes.append(np.uint64(1 << 8) + (b[:-1] << np.uint64(8)) + b[1:])
    if len(b) >= 3:
        codes.append(np.uint64(1 << 24) + (b[:-2] << np.uint64(16)) + (b[1:-1] << np.uint64(8)) + b[2:])
    all_codes = np.concatenate(codes) if len(b) else np.zeros(0, dtype=np.uint64)
    with np.errstate(over="ignore"):
        buckets = ((all_codes * _MULT) >> np.uint64(40)) % np.uint64(num_features)
    counts = np.log1p(np.bincount(buckets.astype(np.int64), minlength=num_features).astype(np.float32))
    norm = np.linalg.norm(counts)
    return counts / norm if norm > 0 else counts


class CategoryRouter(nn.Module):
    """A linear classifier over hashed byte n-grams; `categories[c]` names output c."""

    def __init__(self, categories: list[str], num_features: int = 4096, max_bytes: int = 4096):
        super().__init__()
        if len(categories) < 1 or len(set(categories)) != len(categories):
            raise UsageError(f"CategoryRouter: categories must be distinct names, got {categories}")
        self.categories = list(categories)
        self.num_features, self.max_bytes = num_features, max_bytes
        self.weight = nn.Parameter(torch.zeros(len(categories), num_features))
        self.bias = nn.Parameter(torch.zeros(len(categories)))

    def features(self, texts: list[str]) -> torch.Tensor:
        return torch.from_numpy(np.stack([hashed_ngrams(t, self.num_features, self.max_bytes) for t in texts])) \
            if texts else torch.zeros(0, self.num_features)

    def forward(self, feats_NX: torch.Tensor) -> torch.Tensor:
        return F.linear(feats_NX, self.weight, self.bias)

    @torch.no_grad()
    def predict_proba(self, texts: list[str]) -> torch.Tensor:
        """(N, C) category probabilities."""
        return torch.softmax(self(self.features(texts)), dim=-1)

    def fit(self, texts: list[str], categories: list[str], steps: int = 300, lr: float = 0.1,
            weight_decay: float = 1e-4, seed: int = 0) -> list[float]:
        """Train on labelled texts (full batch); returns the loss per step. UsageError for a label that
        is not one of the router's categories."""
        unknown = sorted(set(categories) - set(self.categories))
        if unknown:
            raise UsageError(f"CategoryRouter.fit: label {unknown[0]!r} is not a category; categories: {self.categories}")
        if not texts:
            raise UsageError("CategoryRouter.fit: no labelled examples")
        torch.manual_seed(seed)
        feats_NX = self.features(texts)
        labels_N = torch.tensor([self.categories.index(c) for c in categories])
        optimizer = torch.optim.Adam(self.parameters(), lr=lr)
        history = []
        for _ in range(steps):
            loss = F.cross_entropy(self(feats_NX), labels_N) + weight_decay * self.weight.pow(2).sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            history.append(float(loss.detach()))
        return history
