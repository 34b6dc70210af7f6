"""Adapters so a wrapped transformers model runs through moekit's evaluation, generation and analysis.

`HFCausalLM(model)`: `forward(ids_BT) -> logits`, `moe_layers()`, parameters of the model.
`HFTokenizer(tok)`: the `moekit.data.Tokenizer` interface over a transformers tokenizer, with the
UTF-8 byte length of every token (for bits per byte). Without a tokenizer in the model directory,
`tokenizer_for(None, vocab_size)` falls back to moekit's byte tokenizer when the vocabulary can hold it.
"""

from __future__ import annotations

import re

import numpy as np
import torch
from torch import nn

from moekit.data import ByteTokenizer
from moekit.layers import moe_layers
from moekit.utils.ids import check_token_ids

_BYTE_TOKEN = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


class HFCausalLM(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    @property
    def vocab_size(self) -> int:
        """Token ids the model takes: the rows of its input embedding."""
        return self.model.get_input_embeddings().num_embeddings

    def forward(self, ids_BT: torch.Tensor, padding_mask_BT: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, V) of ids (B, T); UsageError for an id outside [0, vocab_size) (the embedding's raw
        IndexError otherwise; on CUDA a device-side assert)."""
        check_token_ids(ids_BT, self.vocab_size, "HFCausalLM", "the rows of the model's input embedding")
        return self.model(input_ids=ids_BT, attention_mask=padding_mask_BT, use_cache=False).logits

    def moe_layers(self):
        return moe_layers(self.model)

    def eos_ids(self) -> list[int]:
        """The ids transformers' `generate` stops at: the model's `generation_config.eos_token_id` (one id, a
        list, or none). moekit's own loops (offloaded generation) stop at the same ids, so their text equals
        the resident run's."""
        eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        return [] if eos is None else [int(eos)] if isinstance(eos, int) else [int(i) for i in eos]

    def unapplied_generation_settings(self, sampling: bool) -> dict:
        """The settings of the model's `generation_config` that transformers' `generate` would decode with and
        moekit's loops do not apply (they sample as their temperature / top_p arguments say): {name: value}
        for each one set to other than its no-op value (`do_sample=True`, `repetition_penalty=1.1`, `top_k=20`);
        the sampling-only ones (top_k, ...) where the loop (`sampling`) or the generation_config samples."""
        gen = getattr(self.model, "generation_config", None)
        sampling = sampling or getattr(gen, "do_sample", None) is True
        return {name: value for name, noop in _DECODING_NOOPS.items()
                if (value := getattr(gen, name, None)) is not None and value != noop
                and (sampling or name not in _SAMPLING_ONLY)}


# generation_config fields that change which token transformers' generate picks, with the value that changes
# nothing (None: unset, transformers 5's default for each)
_DECODING_NOOPS = {"do_sample": False, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "typical_p": 1.0,
                   "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
                   "num_beams": 1, "min_length": 0, "min_new_tokens": 0, "bad_words_ids": None,
                   "suppress_tokens": None, "begin_suppress_tokens": None, "forced_bos_token_id": None,
                   "forced_eos_token_id": None, "sequence_bias": None}
# those transformers' generate reads only when it samples (a greedy run ignores them)
_SAMPLING_ONLY = {"temperature", "top_k", "top_p", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff"}


class HFTokenizer:
    def __init__(self, tok):
        self.tok = tok
        self.vocab_size = len(tok)
        self.eos_id = tok.eos_token_id if tok.eos_token_id is not None else 0
        self.bos_id = tok.bos_token_id if tok.bos_token_id is not None else self.eos_id
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else self.eos_id

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def encode_batch(self, texts) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def token_bytes(self) -> np.ndarray:
        """UTF-8 bytes per token: byte-level BPE tokens are one character per byte; SentencePiece
        tokens map '▁' to a space and byte-fallback tokens <0xNN> to one byte; specials are 0."""
        special = set(self.tok.all_special_ids)
        byte_level = "ByteLevel" in repr(getattr(getattr(self.tok, "backend_tokenizer", None), "pre_tokenizer", ""))
        out = np.zeros(self.vocab_size, dtype=np.int64)
        for i, t in enumerate(self.tok.convert_ids_to_tokens(list(range(self.vocab_size)))):
            if i in special or t is None:
                continue
            if _BYTE_TOKEN.match(t):
                out[i] = 1
            elif byte_level:
                out[i] = len(t)
            else:
                out[i] = len(t.replace("\u2581", " ").encode("utf-8"))
        return out


def tokenizer_for(tok, vocab_size: int):
    if tok is not None:
        return HFTokenizer(tok)
    if vocab_size < ByteTokenizer.vocab_size:
        raise ValueError(f"the model directory has no tokenizer and its vocab_size={vocab_size} cannot hold moekit's "
                         f"byte tokenizer ({ByteTokenizer.vocab_size} ids); save a tokenizer with the model")
    tokenizer = ByteTokenizer()
    tokenizer.vocab_size = vocab_size  # the model's extra ids decode to nothing, like byte specials
    return tokenizer
