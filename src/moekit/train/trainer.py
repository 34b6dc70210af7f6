"""Training a moekit language model: one plain function, `train(...)`.

Per optimiser step s:
  lr(s)    linear warm-up for `warmup_steps`, then cosine decay to `min_lr_ratio * lr`
  for each of `grad_accum` micro-batches m:
      batch(s, m): `micro_batch` random windows of `seq_len + 1` tokens drawn from the train
                   stream by a generator seeded with (seed, s, m) -- so the data position is just
                   the step, and a resumed run sees exactly the batches it would have seen
      loss = cross-entropy + sum_name coef[name] * aux[name]   (aux averaged over MoE layers)
      backward(loss / grad_accum)     -- the global-batch balance loss accumulates here
  clip the gradient norm, AdamW step; its step hook (moekit.train.balance.BalanceTracker) runs the
  routers' once-per-step updates (aux-loss-free bias, k schedules)

A resumed run restores weights, optimiser state, RNG states and the step, and truncates
metrics.jsonl to the steps before the checkpoint, so its loss curve is bit-identical to an
uninterrupted run (same machine and thread count). It keeps its saved configuration: settings that
differ from it are refused, never applied silently.

A step whose loss or gradient norm is not finite stops the run before the optimiser updates the
weights (DivergedError naming the step); the last checkpoint stays as it was.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

import moekit
from moekit.config import Config, check_fields, require, setting
from moekit.data import (
    DOMAINS,
    ByteTokenizer,
    encode_samples,
    load_bpe_tokenizer,
    load_corpus,
)
from moekit.dispatch.expert_parallel import ExchangeError
from moekit.errors import DataError, MoekitError, UsageError
from moekit.layers.moe import aux_loss_names
from moekit.models import LMConfig, MoELM
from moekit.parallel import ParallelConfig, agree, apply_expert_parallel, init_parallel
from moekit.train import checkpoint as ckpt
from moekit.train import rundir
from moekit.train.balance import BalanceTracker
from moekit.train.evaluate import UNIGRAM_NOTE, evaluate, measured_active_params, unigram_bpb
from moekit.utils.io import atomic_write_text, remove_debris

TOKENIZERS = ("byte", "bpe")


@dataclass
class TrainConfig(Config):
    """Optimisation and data. Aux-loss coefficients multiply the per-layer-averaged aux losses."""

    steps: int = setting(300, "optimiser steps")
    micro_batch: int = setting(16, "sequences per micro-batch")
    grad_accum: int = setting(1, "micro-batches per optimiser step")
    seq_len: int = setting(128, "tokens per training sequence")
    lr: float = setting(3e-3, "peak learning rate (AdamW)")
    min_lr_ratio: float = setting(0.1, "final learning rate of the cosine decay, as a fraction of lr")
    warmup_steps: int = setting(30, "linear warm-up steps")
    weight_decay: float = setting(0.1, "AdamW weight decay on matrices")
    beta1: float = setting(0.9, "AdamW beta1")
    beta2: float = setting(0.95, "AdamW beta2")
    grad_clip: float = setting(1.0, "clip the gradient norm to this (0 = no clipping)")
    seed: int = setting(0, "seed of initialisation and data order")
    bf16: bool = setting(False, "train in bfloat16 autocast")
    tokenizer: str = setting("byte", "byte (259 ids) or the embedded BPE tokenizer", choices=TOKENIZERS)
    load_balance_coef: float = setting(0.01, "coefficient of the Switch load-balancing loss")
    z_loss_coef: float = setting(1e-3, "coefficient of the router z-loss")
    seq_balance_coef: float = setting(0.0, "coefficient of the sequence-wise balance loss (DeepSeek-V3)")
    dynamic_coef: float = setting(1e-4, "coefficient of the dynamic (entropy) loss of top-p routing")
    eval_every: int = setting(0, "evaluate every this many steps (0 = only at the end)")
    eval_tokens: int = setting(8192, "validation tokens per domain in each evaluation")
    checkpoint_every: int = setting(100, "write a checkpoint every this many steps")
    threads: int = setting(0, "torch CPU threads (0 = torch's default)")

    def validate(self) -> TrainConfig:
        """Raises UsageError naming the field and the allowed values (every float must be finite)."""
        check_fields(self)
        for name in ("steps", "micro_batch", "grad_accum", "seq_len", "checkpoint_every", "eval_tokens"):
            require(getattr(self, name) >= 1, f"TrainConfig.{name}", getattr(self, name), "an integer >= 1")
        require(self.lr > 0, "TrainConfig.lr", self.lr, "a finite float > 0")
        require(0 <= self.min_lr_ratio <= 1, "TrainConfig.min_lr_ratio", self.min_lr_ratio, "a float in [0, 1]")
        require(self.warmup_steps >= 0, "TrainConfig.warmup_steps", self.warmup_steps, "an integer >= 0")
        require(self.weight_decay >= 0, "TrainConfig.weight_decay", self.weight_decay, "a finite float >= 0")
        for name in ("beta1", "beta2"):
            require(0 <= getattr(self, name) < 1, f"TrainConfig.{name}", getattr(self, name), "a float in [0, 1)")
        require(self.grad_clip >= 0, "TrainConfig.grad_clip", self.grad_clip, "a finite float >= 0 (0 = no clipping)")
        require(0 <= self.seed < 2**63, "TrainConfig.seed", self.seed, "an integer in [0, 2**63)")
        for name in ("load_balance_coef", "z_loss_coef", "seq_balance_coef", "dynamic_coef"):
            require(getattr(self, name) >= 0, f"TrainConfig.{name}", getattr(self, name), "a finite float >= 0")
        require(self.eval_every >= 0, "TrainConfig.eval_every", self.eval_every,
               "an integer >= 0 (0 = evaluate only at the end)")
        require(self.tokenizer in TOKENIZERS, "TrainConfig.tokenizer", self.tokenizer, f"one of {TOKENIZERS}")
        require(self.threads >= 0, "TrainConfig.threads", self.threads, "an integer >= 0 (0 = torch's default)")
        return self

    @property
    def aux_coefs(self) -> dict[str, float]:
        return {"load_balance": self.load_balance_coef, "z_loss": self.z_loss_coef,
                "seq_balance": self.seq_balance_coef, "dynamic": self.dynamic_coef}

    @property
    def tokens_per_step(self) -> int:
        return self.micro_batch * self.grad_accum * self.seq_len


def aux_coefs_for(model_cfg: LMConfig, cfg: TrainConfig) -> dict[str, float]:
    """The coefficient of each aux loss in the training loss: TrainConfig's, and for the router's own
    losses TrainConfig does not name, the router config's (`RouterConfig.aux_loss_coefs`)."""
    own = cfg.aux_coefs
    return {**own, **{n: c for n, c in model_cfg.moe.router.aux_loss_coefs().items() if n not in own}}


def make_tokenizer(name: str):
    return ByteTokenizer() if name == "byte" else load_bpe_tokenizer()


@functools.lru_cache(maxsize=2)
def train_stream(tokenizer_name: str) -> np.ndarray:
    """The train split as one read-only token stream, encoded once per process and tokenizer."""
    tokens, _ = encode_samples(load_corpus("train"), make_tokenizer(tokenizer_name))
    tokens.flags.writeable = False
    return tokens


@functools.lru_cache(maxsize=2)
def _validation_lengths(tokenizer_name: str) -> dict[str, int]:
    tokenizer = make_tokenizer(tokenizer_name)
    return {d: len(encode_samples(load_corpus("validation", d), tokenizer)[0]) for d in DOMAINS}


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


def resolve_configs(model_cfg: LMConfig, cfg: TrainConfig) -> tuple[LMConfig, TrainConfig]:
    """The configs as a run uses them: validated (UsageError), the model's vocabulary set to the
    tokenizer's, and the sequence length within the model's `max_seq_len`."""
    cfg.validate()
    vocab_size = make_tokenizer(cfg.tokenizer).vocab_size
    if vocab_size != model_cfg.vocab_size:
        model_cfg = dataclasses.replace(model_cfg, vocab_size=vocab_size)
    model_cfg.validate()
    require(cfg.seq_len <= model_cfg.max_seq_len, "TrainConfig.seq_len", cfg.seq_len,
           f"an integer in [1, {model_cfg.max_seq_len}] (at most LMConfig.max_seq_len)")
    return model_cfg, cfg


def _settings(config: dict[str, Any]) -> dict[str, Any]:
    """{"TrainConfig.lr": 0.003, "RouterConfig.p": 0.4, ...} of a resolved config."""
    model = dict(config["model"])
    moe = dict(model.pop("moe"))
    router = moe.pop("router")
    moe.pop("d_model")  # always LMConfig.d_model
    sections = {"LMConfig": model, "MoEConfig": moe, "RouterConfig": router, "TrainConfig": config["train"]}
    return {f"{cls}.{k}": v for cls, d in sections.items() for k, v in d.items() if k not in ("type", "version")}


def config_differences(saved: dict[str, Any], requested: dict[str, Any]) -> list[str]:
    """Each setting of `requested` that differs from `saved` (resolved configs), as `Class.field=value
    (the run has value)`."""
    a, b = _settings(saved), _settings(requested)
    return [f"{k}={b.get(k)!r} (the run has {a.get(k)!r})" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _configs_from(d: dict[str, Any], source: Path) -> tuple[LMConfig, TrainConfig]:
    try:
        return LMConfig.from_dict(d["model"]), TrainConfig.from_dict(d["train"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise DataError(f"{source} does not hold a moekit run configuration ({type(e).__name__}: {e})") from None


def _check_is_run(run_dir: Path) -> None:
    if not (run_dir / "config.json").is_file() and not (run_dir / ckpt.CHECKPOINT_DIR).is_dir():
        raise UsageError(f"{run_dir} is not a moekit run (it has no config.json or checkpoints/); expected the "
                         "--out directory of `moekit train`")


def load_run_config(run_dir: str | os.PathLike) -> tuple[LMConfig, TrainConfig]:
    """The run's configuration: its latest checkpoint's own (verified through meta.json), or, before
    the first checkpoint, the run's config.json (verified by its checksum)."""
    run_dir = Path(run_dir)
    _check_is_run(run_dir)
    if ckpt.has_checkpoint(run_dir):
        path = ckpt.latest_checkpoint(run_dir)
        return _configs_from(ckpt.read_config(path), path / "config.json")
    return _configs_from(ckpt.read_json(run_dir / "config.json"), run_dir / "config.json")


def load_trained(run_dir: str | os.PathLike) -> tuple[MoELM, TrainConfig, Any]:
    """The latest checkpoint's model (eval mode), built from the checkpoint's own verified config,
    its TrainConfig and tokenizer. Raises UsageError for a directory that is not a run and
    CheckpointError (a DataError) for a missing or damaged checkpoint."""
    run_dir = Path(run_dir)
    _check_is_run(run_dir)
    path = ckpt.latest_checkpoint(run_dir)
    config = ckpt.read_config(path)
    model_cfg, cfg = _configs_from(config, path / "config.json")
    model = MoELM(model_cfg)
    if config.get("compression") is not None:  # written by moekit compress: merged or quantised experts
        from moekit.compress import restore

        restore(model, config["compression"])
    ckpt.load_model_weights(path, model)
    return model.eval(), cfg, make_tokenizer(cfg.tokenizer)


def save_trained(model: MoELM, cfg: TrainConfig, run_dir: str | os.PathLike, compression: dict | None = None,
                 step: int = 0, what: str = "moekit compress") -> Path:
    """Write `model` as a run `load_trained` (and `moekit eval | generate | analyze | offload`) reads: the
    run directory's config.json and one checkpoint (model weights, no optimiser state) whose config
    carries the compression record. `run_dir` must be absent, empty or a moekit run (its checkpoints are
    replaced). Returns the checkpoint path."""
    run_dir = Path(run_dir)
    config = {**resolved_config(model.cfg, cfg), "compression": compression}
    with rundir.locked_dir(run_dir, "run", what):
        ckpt.write_json(run_dir / "config.json", config)
        meta = {"seed": cfg.seed, "moekit_version": moekit.__version__, "compressed": compression is not None}
        return ckpt.save_checkpoint(run_dir, step, model, None, config, meta, keep=1)


def _read_metrics(path: Path) -> tuple[list[dict[str, Any]], list[bytes]]:
    if not path.exists():
        return [], []
    lines = path.read_bytes().split(b"\n")
    rows, raw = [], []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("not an object")
        except ValueError:  # (UnicodeDecodeError is a ValueError)
            if all(not rest.strip() for rest in lines[i:]):
                break  # the last line, cut short by a crash or a full disk: dropped
            raise DataError(f"{path} line {i} is damaged; expected one JSON object per line") from None
        rows.append(row)
        raw.append(line)
    return rows, raw


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a run's metrics.jsonl; a last line cut short (a crash mid-write) is dropped and a
    damaged earlier line is a DataError naming the file and line."""
    return _read_metrics(Path(path))[0]


def _truncate_metrics(path: Path, last_step: int) -> None:
    rows, raw = _read_metrics(path)
    kept = [line for row, line in zip(rows, raw, strict=True) if row.get("step", 0) <= last_step]
    atomic_write_text(path, "".join(line.decode("utf-8") + "\n" for line in kept))


def _append(f, data: bytes) -> None:
    """Append a whole line or nothing: a failed write (a full disk) is cut back before it is raised."""
    end = f.seek(0, os.SEEK_END)
    try:
        view = memoryview(data)
        while view:
            view = view[f.write(view):]
    except OSError:
        try:
            f.truncate(end)
        except OSError:
            pass  # the next --resume cuts the partial line
        raise


def _kept(last_saved: int) -> str:
    return f"checkpoint step-{last_saved:08d} is intact" if last_saved else "no checkpoint was written yet"


def _check_corpus_fits(tokenizer_name: str, seq_len: int) -> None:
    """A window of seq_len + 1 tokens must fit in each validation domain's text (the train split is
    far longer than any of them)."""
    lengths = _validation_lengths(tokenizer_name)
    shortest = min(lengths, key=lengths.get)
    limit = lengths[shortest] - 1
    require(seq_len <= limit, "TrainConfig.seq_len", seq_len,
           f"at most {limit} (the {shortest} validation text is {lengths[shortest]} tokens with this tokenizer)")


class DivergedError(MoekitError):
    """The training loss or gradient norm stopped being finite."""


def _test_pause(step: int) -> float:
    """Tests set MOEKIT_TEST_CHECKPOINT_PAUSE=STEP:SECONDS to stall inside checkpoint STEP's write
    (and kill the process there)."""
    spec = os.environ.get("MOEKIT_TEST_CHECKPOINT_PAUSE", "")
    if not spec:
        return 0.0
    at, seconds = spec.split(":")
    return float(seconds) if int(at) == step else 0.0


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def train(model_cfg: LMConfig | None, cfg: TrainConfig | None, run_dir: str | os.PathLike, resume: bool = False,
          progress: bool = True, log=print, parallel: ParallelConfig | None = None) -> dict[str, Any]:
    """Train (or resume) a run in `run_dir`; returns the final evaluation.

    `parallel`: expert x data parallelism over the processes torchrun started (moekit.parallel); every
    rank calls `train` with the same arguments, each reads its share of every micro-batch, and rank 0
    alone writes the run's files and reports progress. The losses equal one process's on the same
    global batch; checkpoints are consolidated, so a run resumes with any layout.

    `run_dir` must be absent, empty or a moekit run; the process holds its lock while it trains.
    When resuming, the run's saved configuration is used; `model_cfg` / `cfg` may be None, and when
    given must equal it. Progress goes to stderr: a bar on a terminal, otherwise about ten lines.

    Raises NotOwnedError (a directory with files moekit did not write), DirectoryLockedError (another
    process trains this run), UsageError (an invalid setting, a setting that differs from the resumed
    run, or a new run over an existing one), DataError (a damaged file of the run), DivergedError
    (a non-finite loss) and WriteError (a file that cannot be written, e.g. a full disk).
    """
    run_dir = Path(run_dir)
    mesh = init_parallel(parallel) if parallel is not None else None
    if mesh is not None:
        return _train_distributed(model_cfg, cfg, run_dir, resume, progress, log, mesh)
    if resume:
        _check_is_run(run_dir)
    elif model_cfg is None or cfg is None:
        raise UsageError("train: model_cfg and cfg are required for a new run (None only with resume=True)")
    else:  # settings are checked before anything is written
        model_cfg, cfg = resolve_configs(model_cfg, cfg)
        _check_corpus_fits(cfg.tokenizer, cfg.seq_len)
    try:
        with rundir.locked_dir(run_dir, "run", "moekit train"):
            remove_debris(run_dir / ckpt.CHECKPOINT_DIR)
            return _train(model_cfg, cfg, run_dir, resume, progress, log)
    except OSError as e:
        if e.errno not in _DISK_FULL:
            raise
        raise ckpt.WriteError(f"cannot write to {e.filename or run_dir}: {ckpt.one_line(e)}; the last checkpoint "
                              "is intact") from e


def _train_distributed(model_cfg, cfg, run_dir: Path, resume: bool, progress: bool, log, mesh) -> dict[str, Any]:
    """`train` on every rank of `mesh`: rank 0 checks and locks the run directory, then every rank
    learns whether it could (`agree`: one rank's error stops all, none waits)."""
    writer = torch.distributed.get_rank() == 0
    with contextlib.ExitStack() as stack:
        problem, error = None, None
        try:
            if resume:
                _check_is_run(run_dir)
            elif model_cfg is None or cfg is None:
                raise UsageError("train: model_cfg and cfg are required for a new run (None only with resume=True)")
            else:
                model_cfg, cfg = resolve_configs(model_cfg, cfg)
                _check_corpus_fits(cfg.tokenizer, cfg.seq_len)
            if writer:
                stack.enter_context(rundir.locked_dir(run_dir, "run", "moekit train"))
                remove_debris(run_dir / ckpt.CHECKPOINT_DIR)
        except (MoekitError, ValueError, OSError) as e:
            problem, error = ckpt.one_line(e), e
        try:
            agree(problem)
        except MoekitError:
            if error is not None:
                raise error from None
            raise
        try:
            return _train(model_cfg, cfg, run_dir, resume, progress and writer, log if writer else _quiet, mesh=mesh)
        except torch.distributed.DistError as e:  # a collective outside the expert exchange (DDP, reductions)
            raise ExchangeError(f"rank {torch.distributed.get_rank()}: a collective failed; another rank probably "
                                f"failed first (see its error). Cause: {ckpt.one_line(e)}") from e


def _check_trainable(run_dir: Path, compression: dict[str, Any]) -> None:
    """UsageError for a compressed run that cannot train: quantised experts are int codes without gradients;
    merged layers route to E experts executed by fewer (the balance statistics count one of the two)."""
    methods = {step.get("method") for step in compression.get("steps", [])}
    if "quantize" in methods:
        raise UsageError(f"{run_dir} holds quantised experts (moekit compress --quantize), which take no gradient and "
                         "are not trained; train the unquantised (pruned) run, then quantise it")
    if "merge" in methods:
        raise UsageError(f"{run_dir} holds merged experts (moekit compress --merge: router experts mapped to fewer "
                         "experts), which moekit does not train; train the run before merging, or prune instead")


def _quiet(*args, **kwargs) -> None:
    """The log of ranks other than 0."""


def _train(model_cfg, cfg, run_dir: Path, resume: bool, progress: bool, log, mesh=None) -> dict[str, Any]:
    writer = mesh is None or torch.distributed.get_rank() == 0
    compression, fine_tune = None, False
    if resume:
        saved = resolve_configs(*load_run_config(run_dir))
        model_cfg, cfg = resolve_configs(saved[0] if model_cfg is None else model_cfg,
                                         saved[1] if cfg is None else cfg)
        if ckpt.has_checkpoint(run_dir):
            latest = ckpt.latest_checkpoint(run_dir)
            compression = ckpt.read_config(latest).get("compression")
            fine_tune = bool(ckpt.read_meta(latest).get("compressed"))
        if compression is not None:
            _check_trainable(run_dir, compression)
        differ = config_differences(resolved_config(*saved), resolved_config(model_cfg, cfg))
        if fine_tune:  # a run moekit compress wrote starts a new schedule: only the model must stay
            differ = [d for d in differ if not d.startswith("TrainConfig.")]
        if differ:
            raise UsageError(f"{run_dir} was trained with other settings, and a resumed run keeps its configuration "
                             f"(drop them, or train into a new directory): {'; '.join(differ)}")
    elif ckpt.has_checkpoint(run_dir) or any((run_dir / ckpt.CHECKPOINT_DIR).glob("step-*")):
        raise UsageError(f"{run_dir} already holds a run; resume it (--resume) or choose another directory")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    tokenizer = make_tokenizer(cfg.tokenizer)
    if resume:
        _check_corpus_fits(cfg.tokenizer, cfg.seq_len)
    tokens = train_stream(cfg.tokenizer)
    config = resolved_config(model_cfg, cfg)
    if compression is not None:  # every checkpoint of a compressed run carries the record (merged layers)
        config["compression"] = compression
    if writer:
        ckpt.write_json(run_dir / "config.json", config)

    torch.manual_seed(cfg.seed)
    device = torch.device("cpu") if mesh is None else torch.device(mesh.device_type, torch.accelerator.current_device_index()
                                                                  if mesh.device_type != "cpu" else None)
    model = MoELM(model_cfg)
    if compression is not None:
        from moekit.compress import restore

        restore(model, compression)
    model = model.to(device)
    start_step, meta = 0, None
    metrics_path = run_dir / "metrics.jsonl"
    if resume and ckpt.has_checkpoint(run_dir):
        path = ckpt.latest_checkpoint(run_dir)
        meta = ckpt.read_meta(path)
        ckpt.load_model_weights(path, model)
        if fine_tune:  # the compressed weights, no optimiser state and no RNG state: a fresh start from them
            log(f"fine-tuning the compressed model of {path} from step 0 with a fresh optimiser "
                f"({' + '.join(step['method'] for step in compression['steps'])})")
            meta = None
        else:
            ckpt.set_rng_state(meta["rng"])
            start_step = meta["step"]
    # Experts sharded after the full model is built (or loaded): checkpoints hold every expert.
    par = apply_expert_parallel(model, mesh) if mesh is not None else None
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr,
                                  betas=(cfg.beta1, cfg.beta2))
    if meta is not None:
        state = ckpt.read_optimizer_state(path, meta)
        optimizer.load_state_dict(state if par is None else par.shard_optimizer_state(optimizer, state))
        log(f"resumed from {path} at step {start_step}")
    elif resume and not fine_tune:
        log(f"{run_dir} has no checkpoint yet: starting from step 0")
    if not writer:
        pass  # rank 0 owns the files
    elif start_step:
        _truncate_metrics(metrics_path, start_step)
    else:
        metrics_path.unlink(missing_ok=True)
    last_saved = start_step
    if par is not None:
        log(f"layout: {par.world} ranks, expert parallel {par.ep_size} x data parallel {par.dp_size} "
            f"({torch.distributed.get_backend()}); each rank "
            f"reads {cfg.micro_batch // par.world} of every micro-batch's {cfg.micro_batch} sequences")
        par.batch_rows(cfg.micro_batch)  # raises UsageError on every rank alike

    router = model_cfg.moe.router
    count = (f"{model_cfg.num_active_params():,} active per token" if router.fixed_experts_per_token() else
             f"{model_cfg.num_active_params():,} active per token by the config's count (dynamic routing: the "
             "measured count follows the evaluation)")
    log(f"model: {model_cfg.num_params():,} parameters, {count} ({router.kind}: {router.describe()})")
    produced = aux_loss_names(model_cfg.moe)
    coefs = aux_coefs_for(model_cfg, cfg)
    terms = " + ".join(f"{c:g}*{n}" for n, c in coefs.items() if c and n in produced) or "0"
    off = ", ".join(n for n, c in coefs.items() if n in produced and not c)
    log(f"loss = lm_loss + {terms}" + (f" (off: {off})" if off else "") + ", aux losses averaged over MoE layers")
    log(f"unigram baseline: {unigram_bpb('validation', tuple(DOMAINS)):.3f} bits per byte (validation; a byte-frequency "
        "model with no context)")

    bar = None
    if progress and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(initial=start_step, total=cfg.steps, desc="train", unit="step", dynamic_ncols=True)
    report_every = max(1, math.ceil(cfg.steps / 10))  # without a terminal: about ten plain lines
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16)
    if model.moe_layers():  # an all-dense model (n_dense == n_layers) has no routing state
        # the routers' once-per-step updates run in optimizer.step(), from the counts of every rank's tokens
        BalanceTracker(model, group=None if par is None else par.data_group).attach(optimizer)
    model.train()
    params = list(model.parameters())
    forward = model if par is None else par.module
    try:
        with open(metrics_path, "ab", buffering=0) as metrics_file:
            for step in range(start_step, cfg.steps):
                t0 = time.perf_counter()
                lr = lr_at(step, cfg)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                sums: dict[str, float] = {}
                experts_L = np.zeros(len(model.moe_layers()))
                for micro in range(cfg.grad_accum):
                    ids_BT = batch_at(tokens, step, micro, cfg)
                    if par is not None:
                        ids_BT = ids_BT[par.batch_rows(cfg.micro_batch)].to(device)
                    # DDP averages dense gradients at the last micro-batch only
                    sync = (contextlib.nullcontext() if par is None or micro == cfg.grad_accum - 1
                            else par.module.no_sync())
                    with sync:
                        with autocast:
                            logits_BTV = forward(ids_BT[:, :-1])
                        lm_loss = F.cross_entropy(logits_BTV.float().flatten(0, 1), ids_BT[:, 1:].flatten())
                        aux = model.aux_losses()
                        loss = lm_loss + sum(coefs.get(name, 0.0) * value for name, value in aux.items())
                        (loss / cfg.grad_accum).backward()
                    for name, value in {"loss": loss, "lm_loss": lm_loss, **aux}.items():
                        sums[name] = sums.get(name, 0.0) + float(value.detach()) / cfg.grad_accum
                    for j, layer in enumerate(model.moe_layers()):
                        experts_L[j] += layer.routing_info().stats()["experts_per_token_mean"] / cfg.grad_accum
                if par is not None:  # the logged figures are the global batch's: the mean over ranks
                    sums, experts_L = _mean_over_ranks(sums, experts_L, device)
                    grad_norm = par.clip_grad_norm_(cfg.grad_clip)
                else:
                    grad_norm = (torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip) if cfg.grad_clip > 0 else
                                 torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))
                if not (math.isfinite(sums["loss"]) and math.isfinite(float(grad_norm))):
                    raise DivergedError(
                        f"training diverged at step {step + 1}: loss {sums['loss']:.4g}, gradient norm "
                        f"{float(grad_norm):.4g}; stopped before updating the weights ({_kept(last_saved)}); lower "
                        f"the learning rate (lr={cfg.lr}) or raise warmup_steps in a new run")
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                dt = time.perf_counter() - t0
                record = {"step": step + 1, **{k: round(v, 6) for k, v in sums.items()}, "lr": lr,
                          "grad_norm": float(grad_norm), "tokens": (step + 1) * cfg.tokens_per_step,
                          "tokens_per_s": cfg.tokens_per_step / dt,
                          "experts_per_token": float(experts_L.mean()) if len(experts_L) else 0.0,
                          "experts_per_token_by_layer": experts_L.round(4).tolist()}
                if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
                    ev = evaluate(model, tokenizer, cfg.seq_len, cfg.eval_tokens)
                    record.update(val_loss=ev["loss"], val_bpb=ev["bpb"])
                try:
                    if writer:
                        _append(metrics_file, (json.dumps(record) + "\n").encode("utf-8"))
                except OSError as e:
                    raise ckpt.WriteError(f"cannot append to {metrics_path}: {ckpt.one_line(e)}; stopped at step "
                                          f"{step + 1} ({_kept(last_saved)})") from e
                status = (f"loss {sums['lm_loss']:.3f}, {record['tokens_per_s']:.0f} tokens/s, "
                          f"{record['experts_per_token']:.2f} experts/token")
                if bar is not None:
                    bar.set_postfix_str(status, refresh=False)
                    bar.update(1)
                elif progress and ((step + 1) % report_every == 0 or step + 1 == cfg.steps):
                    print(f"train step {step + 1}/{cfg.steps}: {status}", file=sys.stderr, flush=True)
                if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
                    meta = {"seed": cfg.seed, "data_position": {"step": step + 1}, "rng": ckpt.rng_state(),
                            "moekit_version": moekit.__version__, "tokens_seen": record["tokens"]}
                    if par is None:
                        ckpt.save_checkpoint(run_dir, step + 1, model, optimizer, config, meta,
                                             pause_for_test=_test_pause(step + 1))
                    else:
                        _save_consolidated(par, model_cfg, optimizer, run_dir, step + 1, config, meta, writer)
                    last_saved = step + 1
    finally:
        if bar is not None:
            bar.close()
    result = evaluate(model, tokenizer, cfg.seq_len, cfg.eval_tokens)  # every rank evaluates the same windows
    result["seq_len"], result["eval_tokens"] = cfg.seq_len, cfg.eval_tokens
    result["params"] = model_cfg.num_params()
    result["active_params"] = measured_active_params(model_cfg, result["experts_per_token_by_layer"])
    result["active_params_config"] = model_cfg.num_active_params()
    if writer:
        atomic_write_text(run_dir / "eval.json", json.dumps(result, indent=2))
    log(f"validation ({cfg.eval_tokens} tokens per domain, windows of {cfg.seq_len}): loss {result['loss']:.4f}, "
        f"{result['bpb']:.3f} bits per byte (unigram {result['unigram_bpb']:.3f}), "
        f"{result['experts_per_token']:.2f} experts per token, {result['active_params']:,} active parameters per "
        "token (measured)")
    log(UNIGRAM_NOTE)
    return result


def _mean_over_ranks(sums: dict[str, float], experts_L: np.ndarray, device) -> tuple[dict[str, float], np.ndarray]:
    """Per-rank means of equal shares of the global batch -> the global batch's means (one all-reduce)."""
    flat = torch.tensor([*sums.values(), *experts_L.tolist()], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(flat)
    flat = (flat / torch.distributed.get_world_size()).tolist()
    return dict(zip(sums, flat[:len(sums)], strict=True)), np.asarray(flat[len(sums):])


def _save_consolidated(par, model_cfg: LMConfig, optimizer, run_dir: Path, step: int, config, meta, writer: bool) -> None:
    """Checkpoint `step` as one process would write it (every expert gathered: a collective), written by
    rank 0 with the single-process atomic rules; every rank then learns whether the write succeeded."""
    full_sd = par.full_state_dict()
    opt_sd = par.full_optimizer_state(optimizer)
    opt_sd["state"] = {pid: {k: v.cpu() if torch.is_tensor(v) else v for k, v in st.items()}
                       for pid, st in opt_sd["state"].items()}
    problem, error = None, None
    if writer:
        with torch.device("meta"):
            shadow = MoELM(model_cfg)  # no memory: its tensors are the gathered ones
        shadow.load_state_dict({k: v.cpu() for k, v in full_sd.items()}, assign=True)
        try:
            ckpt.save_checkpoint(run_dir, step, shadow, opt_sd, config,
                                 {**meta, "layout": {"ep": par.ep_size, "dp": par.dp_size}},
                                 pause_for_test=_test_pause(step))
        except MoekitError as e:
            problem, error = ckpt.one_line(e), e
    try:
        par.agree(problem)
    except MoekitError:
        if error is not None:
            raise error from None
        raise
