"""A plain training loop for a model with adapters, and the per-text measures the recipes read.

finetune(model, tokens, cfg) per step s:
  windows  `micro_batch` random windows of seq_len + 1 tokens of the stream, drawn by a generator
           seeded with (seed, s): the same data for the same settings
  loss     cross-entropy of the next token + moekit.adapters.aux_loss(model)
  update   AdamW on the parameters that require gradients (the adapters), linear warm-up then cosine
           decay to lr / 10, gradient clipping, then moekit.adapters.after_optimizer_step(model)

`model(ids_BT)` may return logits (moekit models) or an object with `.logits` (transformers models).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from moekit.adapters.model import after_optimizer_step, aux_loss
from moekit.errors import UsageError


def logits_of(model: nn.Module, ids_BT: torch.Tensor) -> torch.Tensor:
    out = model(ids_BT)
    return out if isinstance(out, torch.Tensor) else out.logits


@dataclass
class FinetuneConfig:
    steps: int = 100
    micro_batch: int = 8
    seq_len: int = 128
    lr: float = 1e-3
    warmup_steps: int = 10
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0

    def validate(self) -> FinetuneConfig:
        for name in ("steps", "micro_batch", "seq_len"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise UsageError(f"FinetuneConfig.{name}={getattr(self, name)!r} is invalid; allowed: an integer >= 1")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise UsageError(f"FinetuneConfig.lr={self.lr!r} is invalid; allowed: a finite number > 0")
        return self

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        progress = min((step - self.warmup_steps) / max(self.steps - self.warmup_steps, 1), 1.0)
        return self.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def windows_at(tokens: np.ndarray, step: int, cfg: FinetuneConfig) -> torch.Tensor:
    """The (micro_batch, seq_len + 1) windows of step `step` (a pure function of seed and step)."""
    if len(tokens) < cfg.seq_len + 2:
        raise UsageError(f"finetune: the text has {len(tokens)} tokens, fewer than one window of seq_len + 1 = "
                         f"{cfg.seq_len + 1}; lower seq_len or give more text")
    rng = np.random.default_rng([cfg.seed, step])
    starts = rng.integers(0, len(tokens) - cfg.seq_len - 1, size=cfg.micro_batch)
    return torch.from_numpy(tokens[starts[:, None] + np.arange(cfg.seq_len + 1)[None, :]].astype(np.int64))


def finetune(model: nn.Module, tokens: np.ndarray, cfg: FinetuneConfig, log=None) -> list[float]:
    """Train the model's trainable parameters (its adapters) on windows of `tokens`; returns the loss of
    each step. The model is left in eval mode."""
    cfg.validate()
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise UsageError("finetune: the model has no trainable parameters (add adapters first)")
    device = params[0].device
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    model.train()
    history = []
    for step in range(cfg.steps):
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr_at(step)
        ids_BT = windows_at(tokens, step, cfg).to(device)
        logits_BTV = logits_of(model, ids_BT[:, :-1])
        loss = F.cross_entropy(logits_BTV.float().flatten(0, 1), ids_BT[:, 1:].flatten()) + aux_loss(model)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"finetune: the loss is {float(loss)} at step {step + 1}; lower lr={cfg.lr}")
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        after_optimizer_step(model)
        history.append(float(loss.detach()))
        if log is not None and ((step + 1) % max(1, cfg.steps // 5) == 0 or step + 1 == cfg.steps):
            log(f"finetune step {step + 1}/{cfg.steps}: loss {history[-1]:.4f}")
    model.eval()
    return history


@torch.no_grad()
def text_scores(model: nn.Module, texts_ids: list[list[int]], max_len: int) -> list[dict[str, float]]:
    """Per text (token ids, at least 2): {"loss": mean next-token loss in nats, "ppl": exp(loss),
    "accuracy": share of next tokens the model ranks first, "tokens": predictions}. Texts longer than
    `max_len` + 1 tokens are cut to their first max_len + 1."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    for ids in texts_ids:
        ids = ids[: max_len + 1]
        if len(ids) < 2:
            raise UsageError("text_scores: each text needs at least 2 tokens")
        ids_1T = torch.tensor([ids], device=device)
        logits_TV = logits_of(model, ids_1T[:, :-1])[0].float()
        target_T = ids_1T[0, 1:]
        loss = float(F.cross_entropy(logits_TV, target_T))
        accuracy = float((logits_TV.argmax(-1) == target_T).float().mean())
        out.append({"loss": loss, "ppl": math.exp(loss), "accuracy": accuracy, "tokens": len(ids) - 1})
    model.train(was_training)
    return out
