"""Training a moekit language model: one plain function, `train(...)`.

Per optimiser step s:
  lr(s)    linear warm-up for `warmup_steps`, then cosine decay to `min_lr_ratio * lr`
  for each of `grad_accum` micro-batches m:
      batch(s, m): `micro_batch` random windows of `seq_len + 1` tokens drawn from the train
                   stream by a generator seeded with (seed, s, m) -- so the data position is just
                   the step, and a resumed run sees exactly the batches it would have seen
      loss = cross-entropy + sum_name coef[name] * aux[name]   (aux averaged over MoE layers)
      backward(loss / grad_accum)     -- the global-batch balance loss accumulates here
  clip the gradient norm, AdamW step, then `after_optimizer_step` (aux-loss-free bias, k schedules)

A resumed run restores weights, optimiser state, RNG states and the step, and truncates
metrics.jsonl to the steps before the checkpoint, so its loss curve is bit-identical to an
uninterrupted run (same machine and thread count).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

import moekit
from moekit.config import _check
from moekit.data import ByteTokenizer, encode_samples, load_bpe_tokenizer, load_corpus, unigram_bits_per_byte
from moekit.layers.moe import aux_loss_names
from moekit.models import LMConfig, MoELM
from moekit.train import checkpoint as ckpt
from moekit.train.evaluate import evaluate

TOKENIZERS = ("byte", "bpe")


@dataclass
class TrainConfig:
    """Optimisation and data. Aux-loss coefficients multiply the per-layer-averaged aux losses."""

    steps: int = 300
    micro_batch: int = 16
    grad_accum: int = 1
    seq_len: int = 128
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 0
    bf16: bool = False
    tokenizer: str = "byte"
    load_balance_coef: float = 0.01
    z_loss_coef: float = 1e-3
    seq_balance_coef: float = 0.0
    dynamic_coef: float = 1e-4
    eval_every: int = 0
    eval_tokens: int = 8192
    checkpoint_every: int = 100
    threads: int = 0

    def validate(self) -> TrainConfig:
        for name in ("steps", "micro_batch", "grad_accum", "seq_len"):
            _check(getattr(self, name) >= 1, f"TrainConfig.{name}", getattr(self, name), "an integer >= 1")
        _check(self.lr > 0, "TrainConfig.lr", self.lr, "a float > 0")
        _check(0 <= self.min_lr_ratio <= 1, "TrainConfig.min_lr_ratio", self.min_lr_ratio, "a float in [0, 1]")
        _check(self.warmup_steps >= 0, "TrainConfig.warmup_steps", self.warmup_steps, "an integer >= 0")
        _check(self.grad_clip >= 0, "TrainConfig.grad_clip", self.grad_clip, "a float >= 0 (0 = no clipping)")
        _check(self.tokenizer in TOKENIZERS, "TrainConfig.tokenizer", self.tokenizer, f"one of {TOKENIZERS}")
        _check(self.threads >= 0, "TrainConfig.threads", self.threads, "an integer >= 0 (0 = torch's default)")
        return self

    @property
    def aux_coefs(self) -> dict[str, float]:
        return {"load_balance": self.load_balance_coef, "z_loss": self.z_loss_coef,
                "seq_balance": self.seq_balance_coef, "dynamic": self.dynamic_coef}

    @property
    def tokens_per_step(self) -> int:
        return self.micro_batch * self.grad_accum * self.seq_len

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def make_tokenizer(name: str):
    return ByteTokenizer() if name == "byte" else load_bpe_tokenizer()


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay from lr to min_lr_ratio * lr at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(cfg.steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def batch_at(tokens: np.ndarray, step: int, micro: int, cfg: TrainConfig) -> torch.Tensor:
    """The (micro_batch, seq_len + 1) windows of micro-batch `micro` of step `step`: a pure function
    of (seed, step, micro), which makes resuming exact."""
    rng = np.random.default_rng([cfg.seed, step, micro])
    starts = rng.integers(0, len(tokens) - cfg.seq_len - 1, size=cfg.micro_batch)
    idx = starts[:, None] + np.arange(cfg.seq_len + 1)[None, :]
    return torch.from_numpy(tokens[idx].astype(np.int64))


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    # Decay matrices only; norms, biases and the (frozen) random router are left alone.
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def resolved_config(model_cfg: LMConfig, cfg: TrainConfig) -> dict[str, Any]:
    return {"model": model_cfg.to_dict(), "train": cfg.to_dict(), "moekit_version": moekit.__version__}


def load_run_config(run_dir: Path) -> tuple[LMConfig, TrainConfig]:
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a moekit run: {path} is missing")
    d = json.loads(path.read_text(encoding="utf-8"))
    return LMConfig.from_dict(d["model"]), TrainConfig(**d["train"])


def load_trained(run_dir: Path) -> tuple[MoELM, TrainConfig, Any]:
    """The latest checkpoint's model (eval mode), its TrainConfig and tokenizer."""
    model_cfg, cfg = load_run_config(run_dir)
    path = ckpt.latest_checkpoint(run_dir)
    ckpt.read_meta(path)
    model = MoELM(model_cfg)
    ckpt.load_model_weights(path, model)
    return model.eval(), cfg, make_tokenizer(cfg.tokenizer)


def _truncate_metrics(path: Path, last_step: int) -> None:
    if not path.exists():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= last_step]
    ckpt.atomic_write_text(path, "".join(line + "\n" for line in kept))


def _test_pause(step: int) -> float:
    """Tests set MOEKIT_TEST_CHECKPOINT_PAUSE=STEP:SECONDS to stall inside checkpoint STEP's write
    (and kill the process there)."""
    spec = os.environ.get("MOEKIT_TEST_CHECKPOINT_PAUSE", "")
    if not spec:
        return 0.0
    at, seconds = spec.split(":")
    return float(seconds) if int(at) == step else 0.0


def train(model_cfg: LMConfig | None, cfg: TrainConfig | None, run_dir: str | os.PathLike, resume: bool = False,
          progress: bool = True, log=print) -> dict[str, Any]:
    """Train (or resume) a run in `run_dir`; returns the final evaluation.

    When resuming, the run's saved config.json is used and `model_cfg` / `cfg` may be None.
    """
    run_dir = Path(run_dir)
    config_path = run_dir / "config.json"
    if resume:
        model_cfg, cfg = load_run_config(run_dir)
    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    tokenizer = make_tokenizer(cfg.tokenizer)
    if tokenizer.vocab_size != model_cfg.vocab_size:
        model_cfg = dataclasses.replace(model_cfg, vocab_size=tokenizer.vocab_size)
    model_cfg.validate()
    config = resolved_config(model_cfg, cfg)
    if not resume:
        if (run_dir / ckpt.CHECKPOINT_DIR).exists():
            raise FileExistsError(f"{run_dir} already holds a run; pass resume=True (--resume) or choose another directory")
        run_dir.mkdir(parents=True, exist_ok=True)
        ckpt.atomic_write_text(config_path, json.dumps(config, indent=2))

    torch.manual_seed(cfg.seed)
    model = MoELM(model_cfg)
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr,
                                  betas=(cfg.beta1, cfg.beta2))
    start_step = 0
    metrics_path = run_dir / "metrics.jsonl"
    if resume:
        path = ckpt.latest_checkpoint(run_dir)
        meta = ckpt.read_meta(path)
        ckpt.load_model_weights(path, model)
        ckpt.load_optimizer(path, optimizer, meta)
        ckpt.set_rng_state(meta["rng"])
        start_step = meta["step"]
        _truncate_metrics(metrics_path, start_step)
        log(f"resumed from {path} at step {start_step}")
    elif metrics_path.exists():
        metrics_path.unlink()

    log(f"model: {model_cfg.num_params():,} parameters, {model_cfg.num_active_params():,} active per token "
        f"({model_cfg.moe.router.kind}: {model_cfg.moe.router.describe()})")
    produced = aux_loss_names(model_cfg.moe)
    terms = " + ".join(f"{c:g}*{n}" for n, c in cfg.aux_coefs.items() if c and n in produced) or "0"
    off = ", ".join(n for n, c in cfg.aux_coefs.items() if n in produced and not c)
    log(f"loss = lm_loss + {terms}" + (f" (off: {off})" if off else "") + ", aux losses averaged over MoE layers")
    log(f"unigram baseline: {unigram_bits_per_byte('validation'):.3f} bits per byte (validation)")
    tokens, _ = encode_samples(load_corpus("train"), tokenizer)

    steps_bar = range(start_step, cfg.steps)
    if progress:
        from tqdm import tqdm

        steps_bar = tqdm(steps_bar, initial=start_step, total=cfg.steps, desc="train", unit="step", dynamic_ncols=True)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16)
    model.train()
    with open(metrics_path, "a", encoding="utf-8") as metrics_file:
        for step in steps_bar:
            t0 = time.perf_counter()
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            sums: dict[str, float] = {}
            experts_L = np.zeros(len(model.moe_layers()))
            for micro in range(cfg.grad_accum):
                ids_BT = batch_at(tokens, step, micro, cfg)
                with autocast:
                    logits_BTV = model(ids_BT[:, :-1])
                lm_loss = F.cross_entropy(logits_BTV.float().flatten(0, 1), ids_BT[:, 1:].flatten())
                aux = model.aux_losses()
                loss = lm_loss + sum(cfg.aux_coefs.get(name, 0.0) * value for name, value in aux.items())
                (loss / cfg.grad_accum).backward()
                for name, value in {"loss": loss, "lm_loss": lm_loss, **aux}.items():
                    sums[name] = sums.get(name, 0.0) + float(value.detach()) / cfg.grad_accum
                for j, layer in enumerate(model.moe_layers()):
                    experts_L[j] += layer.routing_info().stats()["experts_per_token_mean"] / cfg.grad_accum
            grad_norm = (torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                         if cfg.grad_clip > 0 else torch.tensor(0.0))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            moekit.after_optimizer_step(model)
            dt = time.perf_counter() - t0
            record = {"step": step + 1, **{k: round(v, 6) for k, v in sums.items()}, "lr": lr,
                      "grad_norm": float(grad_norm), "tokens": (step + 1) * cfg.tokens_per_step,
                      "tokens_per_s": cfg.tokens_per_step / dt,
                      "experts_per_token": float(experts_L.mean()) if len(experts_L) else 0.0,
                      "experts_per_token_by_layer": experts_L.round(4).tolist()}
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
                ev = evaluate(model, tokenizer, cfg.seq_len, cfg.eval_tokens)
                record.update(val_loss=ev["loss"], val_bpb=ev["bpb"])
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
            if progress:
                steps_bar.set_postfix(loss=f"{sums['lm_loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}",
                                      k=f"{record['experts_per_token']:.2f}")
            if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
                meta = {"seed": cfg.seed, "data_position": {"step": step + 1}, "rng": ckpt.rng_state(),
                        "moekit_version": moekit.__version__, "tokens_seen": record["tokens"]}
                ckpt.save_checkpoint(run_dir, step + 1, model, optimizer, config, meta,
                                     pause_for_test=_test_pause(step + 1))
    result = evaluate(model, tokenizer, cfg.seq_len, cfg.eval_tokens)
    result["active_params"] = model_cfg.num_active_params()
    result["params"] = model_cfg.num_params()
    ckpt.atomic_write_text(run_dir / "eval.json", json.dumps(result, indent=2))
    log(f"validation: loss {result['loss']:.4f}, {result['bpb']:.3f} bits per byte "
        f"(unigram {result['unigram_bpb']:.3f}), {result['experts_per_token']:.2f} experts per token")
    return result
