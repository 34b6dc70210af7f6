"""Validation loss, bits per byte and routing statistics, overall and per domain.

Bits per byte = (sum of next-token losses in nats) / ln 2 / (UTF-8 bytes of the predicted tokens),
so byte-level and BPE models are comparable. Each domain's validation text is one token stream cut
into non-overlapping windows, so every window belongs to one domain.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from moekit.data import DOMAINS, encode_samples, load_corpus, unigram_bits_per_byte
from moekit.errors import UsageError
from moekit.layers.moe import moe_layers
from moekit.utils.ids import check_token_ids

UNIGRAM_NOTE = ("unigram = bits per byte of a byte-frequency model fitted on the train split (no context): "
                "the baseline a language model must beat")


def token_bytes(tokenizer) -> np.ndarray:
    """UTF-8 bytes each token id stands for (0 for special tokens)."""
    V = tokenizer.vocab_size
    if hasattr(tokenizer, "token_bytes"):
        return tokenizer.token_bytes()
    if hasattr(tokenizer, "_tokenizer"):  # byte-level BPE: one character of a token = one byte
        specials = {tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id}
        return np.array([0 if i in specials else len(tokenizer._tokenizer.id_to_token(i) or "")
                         for i in range(V)], dtype=np.int64)
    out = np.zeros(V, dtype=np.int64)
    out[: min(256, V)] = 1
    return out


def domain_windows(tokenizer, domain: str, seq_len: int, max_tokens: int, split: str = "validation") -> torch.Tensor:
    """Non-overlapping windows (n, seq_len + 1) of one domain's stream, at most `max_tokens` predictions."""
    tokens, _ = encode_samples(load_corpus(split, domain), tokenizer)
    n = min((len(tokens) - 1) // seq_len, max(1, max_tokens // seq_len))
    if n <= 0:
        raise UsageError(f"evaluate: seq_len={seq_len} is too long for the {split} split of {domain!r} "
                         f"({len(tokens)} tokens); allowed: at most {len(tokens) - 1}")
    idx = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    return torch.from_numpy(tokens[idx].astype(np.int64))


@functools.lru_cache(maxsize=64)
def unigram_bpb(split: str, domains: tuple[str, ...]) -> float:
    """`unigram_bits_per_byte`, computed once per process (it reads the whole train split)."""
    return unigram_bits_per_byte(split, list(domains))


def measured_active_params(model_cfg, experts_per_token_L: list[float]) -> int:
    """Parameters one token uses, with each MoE layer's experts per token as measured (e.g. on
    validation) rather than the config's count, which for dynamic routers is their worst case."""
    moe = model_cfg.moe
    # A pruned model's layers may hold different expert counts (LMConfig.moe_num_experts).
    counts_L = model_cfg.moe_num_experts or [moe.num_experts] * len(experts_per_token_L)
    unused = sum((E - k) * moe._expert_params() for E, k in zip(counts_L, experts_per_token_L, strict=True))
    return int(round(model_cfg.num_params() - unused))


@torch.no_grad()
def evaluate(model, tokenizer, seq_len: int = 128, max_tokens_per_domain: int = 16384, batch_size: int = 16,
             domains=None, split: str = "validation", autocast_dtype: torch.dtype | None = None) -> dict[str, Any]:
    """Loss and bits per byte overall and per domain, with experts per token by layer and domain.

    `model(ids_BT)` returns logits; MoE statistics are read from its MoE layers (`moekit.moe_layers`), if any.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    nbytes_V = torch.from_numpy(token_bytes(tokenizer))
    layers = moe_layers(model)
    per_domain: dict[str, dict[str, Any]] = {}
    for domain in domains or DOMAINS:
        windows = domain_windows(tokenizer, domain, seq_len, max_tokens_per_domain, split)
        nll = 0.0
        nbytes = 0
        ntok = 0
        experts_L = np.zeros(len(layers))
        zero_compute_L = np.zeros(len(layers))  # picks of zero-computation / null experts (no GEMM)
        for i in range(0, len(windows), batch_size):
            ids_BT = windows[i:i + batch_size].to(device)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                logits_BTV = model(ids_BT[:, :-1])
            target_BT = ids_BT[:, 1:]
            # The targets' last column never reaches the model's own check: cross_entropy's raw error otherwise.
            check_token_ids(target_BT, min(logits_BTV.shape[-1], nbytes_V.numel()), "evaluate: the targets",
                            "the model's and the tokenizer's vocabulary", host=True)
            nll += float(F.cross_entropy(logits_BTV.float().flatten(0, 1), target_BT.flatten(), reduction="sum"))
            nbytes += int(nbytes_V[target_BT.cpu()].sum())
            ntok += target_BT.numel()
            for j, layer in enumerate(layers):
                # Executed assignments (after any capacity dropping): what the active-parameter count measures.
                experts_L[j] += layer.routing_info().executed.num_assignments
                zero_compute_L[j] += layer.routing_info().num_null + sum(
                    n for kind, n in layer.routing_info().zero_compute.items() if kind != "zero")
        per_domain[domain] = {
            "loss": nll / ntok, "bpb": nll / math.log(2) / max(nbytes, 1), "tokens": ntok, "bytes": nbytes,
            "nll_nats": nll,
            "experts_per_token_by_layer": (experts_L / ntok).round(4).tolist(),
            "experts_per_token": float(experts_L.mean() / ntok) if len(layers) else 0.0,
            "zero_compute_per_token_by_layer": (zero_compute_L / ntok).round(4).tolist(),
            "unigram_bpb": unigram_bpb(split, (domain,)),
        }
    model.train(was_training)
    tot_nll = sum(d["nll_nats"] for d in per_domain.values())
    tot_tok = sum(d["tokens"] for d in per_domain.values())
    tot_bytes = sum(d["bytes"] for d in per_domain.values())
    by_layer = np.zeros(len(layers))
    for d in per_domain.values():
        by_layer += np.array(d["experts_per_token_by_layer"]) * d["tokens"]
    by_layer /= max(tot_tok, 1)
    return {
        "loss": tot_nll / tot_tok, "bpb": tot_nll / math.log(2) / max(tot_bytes, 1), "tokens": tot_tok,
        "experts_per_token": float(by_layer.mean()) if len(layers) else 0.0,
        "experts_per_token_by_layer": by_layer.round(4).tolist(),
        "unigram_bpb": unigram_bpb(split, tuple(per_domain)),
        "per_domain": per_domain,
    }
